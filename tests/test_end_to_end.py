"""From model.fit to the CLI report: known NaN step, corrupted last batch, healthy run."""

import json

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402
from tb_stability import cli  # noqa: E402

BATCH = 16


def _fit(log_dir, x, y, every=4, epochs=1):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
              callbacks=[StabilityCallback(str(log_dir), every=every, live_warnings=False)])


def _data(batches, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((batches * BATCH, 6)).astype("float32")
    y = (x[:, :2].sum(axis=1, keepdims=True) > 1.0).astype("float32")
    return x, y


def _report(logdir, capsys):
    code = cli.main(["report", str(logdir), "--format", "json"])
    return code, json.loads(capsys.readouterr().out)


def _findings(report, kind):
    return [f for run in report["runs"] for f in run["findings"] if f["kind"] == kind]


def test_nan_injected_at_known_step_is_reported_at_that_step(tmp_path, capsys):
    x, y = _data(40)
    k = 13
    x[k * BATCH + 3, 2] = np.nan  # one value of batch k
    _fit(tmp_path / "logs" / "nan", x, y)
    code, report = _report(tmp_path / "logs", capsys)
    (finding,) = _findings(report, "nan_inf")
    assert finding["first_step"] == k and finding["severity"] == "critical"
    assert code == 1


def test_corrupted_last_batch_is_a_final_step_spike(tmp_path, capsys):
    x, y = _data(150)
    x[-BATCH:] *= 40.0
    y[-BATCH:] = 1.0 - y[-BATCH:]
    _fit(tmp_path / "logs" / "spike", x, y)
    _, report = _report(tmp_path / "logs", capsys)
    (finding,) = _findings(report, "final_step_spike")
    assert finding["first_step"] == 149
    assert _findings(report, "loss_spike") == []


def test_healthy_baseline_has_no_critical_finding(tmp_path, capsys):
    x, y = _data(40)
    _fit(tmp_path / "logs" / "healthy", x, y, epochs=4)
    code, report = _report(tmp_path / "logs", capsys)
    assert code == 0
    assert [f for run in report["runs"] for f in run["findings"] if f["severity"] == "critical"] == []
