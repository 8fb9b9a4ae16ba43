"""A loss that blows up in its first steps, and a stall that is a rate too large.

The rule (`tb_stability.detectors.blowup`) is checked against hand-made
series first, then on real training: a small MLP trained by a
`tf.GradientTape` loop that logs its per-step loss with `tf.summary.scalar`,
as a user's own loop does, at learning rates 200x to 1000x too large and at
healthy ones.
"""

import numpy as np
import pytest

from tb_stability.analysis import analyze_logdir, report_to_json
from tb_stability.detectors import blowup, trends

rng = np.random.default_rng(0)
NOISE = 1 + 0.05 * rng.standard_normal(400)
DECAY = 2.0 * np.exp(-np.arange(400) / 60) + 0.1


def _with(series, at, values):
    out = np.array(series, dtype=np.float64)
    out[at:at + len(values)] = values
    return out


@pytest.mark.parametrize("values, outcome", [
    pytest.param(DECAY * NOISE, None, id="healthy-decay"),
    pytest.param(_with(DECAY * NOISE, 1, [50, 80, 60, 30, 9, 4]), "recovered", id="blowup-then-recovers"),
    pytest.param(_with(np.full(400, 2.1) * NOISE, 1, [50, 80, 60, 30, 9, 4]), "stuck",
                 id="blowup-then-back-at-initial-loss"),
    pytest.param(_with(np.full(400, 9.0) * NOISE, 0, [2.1, 50, 80, 60, 30, 20]), "diverged",
                 id="blowup-then-stays-high"),
    pytest.param(_with(DECAY * NOISE, 20, [40]), None, id="one-bad-batch-straight-back"),
    pytest.param(np.where(np.arange(400) // 5 % 3 == 1, 2.0, 0.25) * NOISE, None,
                 id="class-weighted-batches-swing-8x"),
    pytest.param(_with(DECAY * NOISE, 200, [50, 80, 60, 30, 9, 4]), None, id="mid-run-not-early"),
    pytest.param(_with(DECAY * NOISE, 1, [9, 9, 9, 9, 9, 4]), None, id="rise-below-5x"),
    pytest.param(_with(30 * np.exp(0.6 * np.random.default_rng(3).standard_normal(400)), 0, [0.69, 0.69, 0.71]),
                 "diverged", id="blowup-then-lives-noisily-far-above-start"),
])
def test_early_blowup_against_hand_made_series(values, outcome):
    got = blowup.early_blowup(values)
    assert (got and got["outcome"]) == outcome, got


def test_early_blowup_reports_where_it_happened():
    values = _with(DECAY * NOISE, 1, [50, 80, 60, 30, 9, 4])
    got = blowup.early_blowup(values)
    assert got["initial"] == values[0]
    assert (got["onset"], got["peak_index"], got["peak"]) == (1, 2, 80.0)
    assert got["back_index"] == int(np.flatnonzero(values[3:] <= values[0])[0]) + 3


tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


def _train(logdir, optimizer, learning_rate, task="regression", steps=512, hparams=None):
    """A 2x128 ReLU MLP trained by a GradientTape loop logging ``train/loss`` every step
    (and ``hparams`` for the HParams dashboard, when given)."""
    data = np.random.default_rng(0)
    x = data.normal(size=(4096, 20)).astype("float32")
    if task == "regression":
        y = (x @ data.normal(size=(20, 1)) + 0.3 * data.normal(size=(4096, 1))).astype("float32")
        outputs = 1

        def loss_fn(yb, pred):
            return tf.reduce_mean((pred - yb) ** 2)
    else:
        y = np.argmax(x @ data.normal(size=(20, 5)) + 0.5 * data.normal(size=(4096, 5)), 1).astype("int32")
        outputs = 5

        def loss_fn(yb, pred):
            return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(yb, pred, from_logits=True))
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(128, activation="relu"),
                              keras.layers.Dense(128, activation="relu"), keras.layers.Dense(outputs)])
    opt = {"adam": lambda: keras.optimizers.Adam(learning_rate),
           "sgd": lambda: keras.optimizers.SGD(learning_rate, momentum=0.9)}[optimizer]()

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    batches = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(4096, seed=0).batch(64).repeat()
    writer = tf.summary.create_file_writer(str(logdir))
    with writer.as_default():
        if hparams:
            from tensorboard.plugins.hparams import api as hp
            hp.hparams(hparams)
        for i, (xb, yb) in enumerate(batches.take(steps)):
            tf.summary.scalar("train/loss", step(xb, yb), step=i)
    writer.close()
    report = analyze_logdir(str(logdir))
    return [f for r in report.runs for f in r.findings], report


def test_adam_at_0_2_blows_up_recovers_and_is_told_to_warm_up(tmp_path):
    findings, report = _train(tmp_path / "run", "adam", 0.2)
    assert [(f.kind, f.severity) for f in findings] == [("divergence", "warning")], report_to_json(report)
    f = findings[0]
    assert f.evidence["early_blowup"] == "recovered"
    assert f.first_step == 1 and f.evidence["ratio_peak_to_initial"] > 50
    assert f.last_step == f.evidence["back_below_initial_step"] > f.first_step + 3
    assert f.evidence["final_loss"] < 0.1 * f.evidence["initial_loss"]
    assert "warmup_steps=100" in f.remedy and "clipnorm" in f.remedy


def test_adam_at_1_blows_up_and_ends_where_it_started_is_critical(tmp_path):
    findings, report = _train(tmp_path / "run", "adam", 1.0, task="classification")
    div = [f for f in findings if f.kind == "divergence"]
    assert [f.severity for f in div] == ["critical"], report_to_json(report)
    assert div[0].evidence["early_blowup"] == "stuck"
    assert 0.8 <= div[0].evidence["ratio_final_to_initial"] < 2
    assert "fresh initialisation" in div[0].remedy and "warmup_target=0.0001" in div[0].remedy
    assert not [f for f in findings if f.kind in ("stalled", "oscillation")]


@pytest.mark.parametrize("optimizer, learning_rate, task", [
    ("adam", 1e-3, "regression"), ("adam", 1e-3, "classification"), ("sgd", 0.01, "classification"),
], ids=["adam-1e-3-regression", "adam-1e-3-classification", "sgd-0.01-classification"])
def test_healthy_twins_have_no_findings(tmp_path, optimizer, learning_rate, task):
    findings, report = _train(tmp_path / "run", optimizer, learning_rate, task=task)
    assert findings == [], report_to_json(report)


def test_a_stall_after_bouncing_is_told_to_lower_the_rate(tmp_path):
    # SGD at 1.0 with momentum: the loss bounces for ~50 steps, then the model collapses
    # to a constant prediction at about its initial loss and stays there, quietly.
    findings, report = _train(tmp_path / "run", "sgd", 1.0, task="classification")
    stalled = [f for f in findings if f.kind == "stalled"]
    assert len(stalled) == 1, report_to_json(report)
    first, last = stalled[0].evidence["relative_spread_first_last"]
    assert first >= trends.NOISIER * last
    assert stalled[0].remedy.startswith("Lower the learning rate")
    assert "too large than too small" in stalled[0].explanation


def test_a_stall_from_a_tiny_rate_is_still_told_to_raise_it(tmp_path):
    findings, report = _train(tmp_path / "run", "sgd", 1e-6, task="classification", steps=300)
    stalled = [f for f in findings if f.kind == "stalled"]
    assert len(stalled) == 1, report_to_json(report)
    assert stalled[0].evidence["relative_spread_first_last"] is None
    assert stalled[0].remedy.startswith("Raise the learning rate")


def test_hparams_give_the_remedy_the_runs_optimizer_and_rate(tmp_path):
    hparams = {"learning_rate": 1.0, "optimizer": "sgd", "momentum": 0.9, "units": 128}
    findings, report = _train(tmp_path / "run", "sgd", 1.0, task="classification", hparams=hparams)
    stalled = [f for f in findings if f.kind == "stalled"]
    assert len(stalled) == 1, report_to_json(report)
    assert stalled[0].evidence["learning_rate"] == 1.0
    assert "keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)" in stalled[0].remedy
    # The same run without hparams: the rate is unknown, Adam is assumed.
    findings, _ = _train(tmp_path / "plain", "sgd", 1.0, task="classification")
    plain = [f for f in findings if f.kind == "stalled"][0]
    assert plain.evidence["learning_rate"] is None
    assert "keras.optimizers.Adam(learning_rate=0.0001)" in plain.remedy


def test_a_gru_at_sgd_30_blew_up_and_every_remedy_cuts_the_rate_alike(tmp_path):
    """The loss went from 0.69 to ~30 within 5 steps and swung between 13 and 106 for the rest of
    the run: as high as its early peak, so it looked like batch noise, and the run was only told
    it drifted up 3x from step 9. The update ratios asked for ~100x lower, divergence for 10x."""
    from instrumentation import StabilityCallback

    data = np.random.default_rng(0)
    x, y = data.integers(1, 300, (1024, 20)), data.integers(0, 2, 1024)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((20,), dtype="int32"), keras.layers.Embedding(300, 16),
                              keras.layers.GRU(32), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(keras.optimizers.SGD(30.0), "binary_crossentropy")
    model.fit(x, y, batch_size=32, epochs=3, verbose=0, callbacks=[StabilityCallback(str(tmp_path), every=10)])
    report = analyze_logdir(str(tmp_path))
    found = {f.kind: f for r in report.runs for f in r.findings}
    div = found["divergence"]
    assert (div.severity, div.evidence["early_blowup"]) == ("critical", "diverged"), report_to_json(report)
    assert div.first_step <= 8 and div.evidence["ratio_final_to_initial"] > 10
    assert div.evidence["initial_loss"] == pytest.approx(np.log(2), rel=0.05)
    high = found["update_ratio_high"]
    assert "~100x" in high.remedy and "learning_rate=0.3," in high.remedy
    assert "learning rate 100x lower" in div.remedy and "warmup_target=0.3," in div.remedy
    # What the blow-up did to the GRU (saturated, frozen, its gradients gone) is reported under it.
    after = [f for r in report.runs for f in r.findings if f.evidence.get("consequence_of") == "divergence"]
    assert {f.kind for f in after} >= {"saturated_activations", "vanishing_gradients"}
    assert all(f.severity == "info" and f.remedy.startswith("Fix the blow-up first") for f in after)


def _per_sample(level, count, seed):
    """A loss as noisy as one sample's cross-entropy (log-spread 1.3), around ``level``."""
    return level * np.exp(1.3 * np.random.default_rng(seed).standard_normal(count))


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_a_noisy_classifier_that_blew_up_at_once_is_told_by_its_first_loss(seed):
    values = _per_sample(16.0, 96, seed)
    values[:2] = [0.693, 4.0]
    # The median of the first 9 points is already ~16: without the base rate there is no start.
    assert blowup.early_blowup(values) is None
    got = blowup.early_blowup(values, base_rate=np.log(2))
    assert (got["outcome"], got["initial"], got["initial_points"], got["level_points"]) == (
        "diverged", 0.693, 1, 9)
    assert got["onset"] == 1  # the first point >= 5x 0.693, not where the lagging median crossed
    # A first loss 7x the label entropy is not a fresh classifier's: it is not trusted as a level.
    assert blowup.early_blowup(values, base_rate=0.1) is None


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_a_noisy_healthy_classifier_starting_at_the_base_rate_is_not_a_blowup(seed):
    values = _per_sample(1.0, 400, seed) * np.linspace(1.0, 0.3, 400)
    values[0] = np.log(3)
    assert blowup.early_blowup(values, base_rate=np.log(3)) is None
