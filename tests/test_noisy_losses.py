"""Tiny batches: a per-sample loss scatters too much for single points to mean anything.

With ``batch_size=1`` the per-step loss of a regression is one example's
squared error, which moves by a factor of ~e^2 from one step to the next. A
lucky first value then looks like a blow-up (`blowup`), and the lowest of many
noisy medians like a level the loss left (`trends.divergence`). Both tests
now weigh a ratio against the series' own point-to-point noise
(`_robust.log_noise`). Checked against numpy on hand-made series first, then
on real fits with `StabilityCallback` that were reported as diverging before.
"""

import numpy as np
import pytest

from tb_stability.detectors import _robust as R
from tb_stability.detectors import blowup, trends


def _slow_log_noise(values):
    """The obvious reference: every second difference of log(x), then their median."""
    logs = [np.log(v) for v in values if np.isfinite(v) and v > 0]
    second = [abs(logs[i - 1] - 2 * logs[i] + logs[i + 1]) for i in range(1, len(logs) - 1)]
    return float(np.median(second)) / 1.652


@pytest.mark.parametrize("sigma", [0.05, 0.3, 2.0], ids=["quiet", "batch-64-like", "per-sample"])
def test_log_noise_recovers_the_spread_of_log_normal_noise(sigma):
    rng = np.random.default_rng(3)
    values = np.exp(sigma * rng.standard_normal(20_000))
    got = R.log_noise(values)
    assert got == pytest.approx(_slow_log_noise(values), rel=1e-12)
    assert got == pytest.approx(sigma, rel=0.05)


def test_log_noise_ignores_a_steady_trend_and_bad_values():
    steady = 3.0 * np.exp(0.7 * np.arange(40))  # grows 2x per point, no noise
    assert R.log_noise(steady) < 1e-9
    with_bad = np.concatenate([[np.nan, -1.0, 0.0], steady, [np.inf]])
    assert R.log_noise(with_bad) == pytest.approx(R.log_noise(steady), abs=1e-12)
    assert np.isnan(R.log_noise(steady[:5]))
    assert R.noise_bound(R.log_noise(steady[:5]), 5.0) == 1.0


def _per_sample_losses(seed, n=800):
    """The per-step loss of batch_size=1: squared errors of a model that learns (chi-square noise)."""
    rng = np.random.default_rng(seed)
    level = 3.0 * np.exp(-np.arange(n) / 60) + 0.1
    return level * rng.standard_normal(n) ** 2


@pytest.mark.parametrize("seed", range(6))
def test_per_sample_noise_is_not_a_blowup_or_a_divergence(seed):
    values = _per_sample_losses(seed)
    assert blowup.early_blowup(values) is None
    assert trends.divergence(values) is None


def test_per_sample_noise_still_shows_a_real_blowup_and_a_real_divergence():
    values = _per_sample_losses(0)
    blown = values.copy()
    blown[30:90] *= 1e3  # 60 steps at 1000x the loss: the weights were thrown out
    got = blowup.early_blowup(blown)
    assert got is not None and got["outcome"] == "recovered", got
    assert got["initial_points"] == blowup.NOISY_HEAD and got["initial"] == np.median(blown[:9])
    assert 30 <= got["onset"] <= 35 and got["peak"] > 100 * got["initial"]
    rising = values * np.exp(np.maximum(0, np.arange(values.size) - 500) / 30)  # 20000x by the end
    got = trends.divergence(rising)
    assert got is not None and got["ratio"] > 100


def test_the_noise_guard_leaves_quiet_series_alone():
    # Batch-64 noise (~5%): the guard is below the fixed ratios, so it never binds.
    rng = np.random.default_rng(0)
    quiet = (2.0 * np.exp(-np.arange(400) / 60) + 0.1) * (1 + 0.05 * rng.standard_normal(400))
    sigma = R.log_noise(quiet)
    assert R.noise_bound(sigma, blowup.NOISE_Z) < blowup.EARLY_RISE
    assert R.noise_bound(sigma, trends.NOISE_Z, points=3) < trends.RISE


tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402
from tb_stability.analysis import analyze_logdir, report_to_json  # noqa: E402


@pytest.mark.parametrize("batch_size, seed", [(1, 1), (2, 0), (4, 2)], ids=["bs1", "bs2", "bs4"])
def test_healthy_tiny_batch_regressions_are_not_diverging(tmp_path, batch_size, seed):
    # Each of these fits was reported as `divergence` before (an early blow-up for bs2, a
    # rise from a lucky best for bs1 and bs4), and bs1 warned CRITICAL divergence live.
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    x = rng.normal(size=(400, 5)).astype("float32")
    y = (x.sum(1, keepdims=True) + 0.3 * rng.normal(size=(400, 1))).astype("float32")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(1e-2) if seed != 2 else keras.optimizers.Adam(1e-3), "mse")
    history = model.fit(x, y, batch_size=batch_size, epochs=2, verbose=0,
                        callbacks=[StabilityCallback(str(tmp_path / "run"), every=10)])
    epoch_loss = history.history["loss"]
    assert epoch_loss[-1] < 0.3 * epoch_loss[0]  # it did learn
    report = analyze_logdir(str(tmp_path))
    kinds = [f.kind for r in report.runs for f in r.findings]
    assert "divergence" not in kinds, report_to_json(report)
    steps = report.runs[0]
    assert steps.findings == [] or all(f.severity != "critical" for f in steps.findings)
