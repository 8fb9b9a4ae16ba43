"""A regression model that learned nothing: an MSE at the labels' variance, or at their
mean square (an output held at zero).

`base_rate.target_moments` is checked against numpy on records the project's
own writer wrote; the rule runs on real fits under `StabilityCallback`:
labels shuffled apart from their inputs (with and without a validation split,
one and two targets) are flagged, while a healthy model, one that learns
slowly and one on noisy labels that explains only part of their variance are
not. AdamW at ``weight_decay=50`` holds a linear model's output at zero (the
bias decays too): the decay is named, and the remedy's optimizer trains the
same model with no finding left.
"""

import re

import numpy as np
import pytest

from tb_stability import schema
from tb_stability.analysis import analyze_logdir
from tb_stability.detectors import base_rate
from tb_stability.reader import load_logdir
from tb_stability.writer import StabilityWriter


def test_target_moments_pool_the_batches_like_numpy(tmp_path):
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc, scale, size=(64, 2)) for loc, scale in
               [(0.0, 1.0), (3.0, 0.5), (-1.0, 2.0), (5.0, 1.5)]]  # batch means far apart
    with StabilityWriter(tmp_path) as writer:
        for step, batch in enumerate(batches):
            stats = np.stack([batch.mean(0), batch.std(0), batch.min(0), batch.max(0)])
            writer.write_targets(step * 100, ["y[0]", "y[1]"], stats)
    run = load_logdir(str(tmp_path)).runs["."]
    assert set(run.targets) == set(schema.INPUT_ROWS)
    everything = np.concatenate(batches)
    variance, square = base_rate.target_moments(run)
    assert variance == pytest.approx(np.mean(everything.var(axis=0)), rel=1e-5)
    assert square == pytest.approx(np.mean((everything ** 2).mean(axis=0)), rel=1e-5)
    with StabilityWriter(tmp_path / "two") as writer:  # too few batches to pool
        for step, batch in enumerate(batches[:2]):
            writer.write_targets(step, ["y[0]", "y[1]"], np.stack(
                [batch.mean(0), batch.std(0), batch.min(0), batch.max(0)]))
    assert base_rate.target_moments(load_logdir(str(tmp_path / "two")).runs["."]) is None


tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402


def _data(noise=0.3, targets=1, shuffled=False, n=2048, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 10)).astype("float32")
    y = np.tanh(x @ rng.standard_normal((10, 1))) * 3 + 5 + noise * rng.standard_normal((n, 1))
    if targets == 2:
        y = np.concatenate([y, 1 - 2 * y], axis=1)
    if shuffled:
        y = y[rng.permutation(n)]  # x and y shuffled apart
    return x, y.astype("float32")


def _fit(logdir, x, y, optimizer="adam", epochs=8, validation=True, hidden=(64, 64)):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((10,))]
                             + [keras.layers.Dense(u, activation="relu") for u in hidden]
                             + [keras.layers.Dense(y.shape[1])])
    model.compile(optimizer, "mse")
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0,
              validation_split=0.2 if validation else 0.0,
              callbacks=[StabilityCallback(str(logdir), every=50)])
    (run,) = analyze_logdir(str(logdir)).runs
    return run


def _base_rate(run):
    return [f for f in run.findings if f.kind == "stalled" and "label_variance" in f.evidence]


@pytest.mark.parametrize("data, validation", [
    pytest.param(dict(shuffled=True), True, id="shuffled-with-validation"),
    pytest.param(dict(shuffled=True), False, id="shuffled-without-validation"),
    pytest.param(dict(shuffled=True, targets=2), True, id="two-targets-shuffled"),
])
def test_labels_shuffled_apart_settle_at_their_variance(tmp_path, data, validation):
    x, y = _data(**data)
    (finding,) = _base_rate(_fit(tmp_path, x, y, validation=validation))
    assert finding.severity == "warning" and finding.evidence["predicts"] == "mean"
    assert 0.85 <= finding.evidence["ratio_to_base"] <= 1.3
    assert finding.evidence["label_variance"] == pytest.approx(np.mean(y.var(axis=0)), rel=0.25)
    assert "predicting their mean for every input" in finding.explanation
    assert finding.remedy.startswith("Check that each label belongs to its input")


@pytest.mark.parametrize("data, optimizer, epochs", [
    pytest.param(dict(), "adam", 8, id="healthy"),
    pytest.param(dict(noise=2.5), "adam", 8, id="noisy-labels-partly-explained"),
    pytest.param(dict(), "sgd-1e-4", 3, id="slow-learner"),
])
def test_models_that_learn_something_are_not_at_the_base_rate(tmp_path, data, optimizer, epochs):
    opt = keras.optimizers.SGD(1e-4) if optimizer == "sgd-1e-4" else optimizer
    run = _fit(tmp_path, *_data(**data), optimizer=opt, epochs=epochs)
    assert _base_rate(run) == []


def test_a_weight_decay_that_holds_the_output_at_zero_is_named_and_its_remedy_trains(tmp_path):
    x, y = _data()
    run = _fit(tmp_path / "decay", x, y, keras.optimizers.AdamW(1e-2, weight_decay=50),
               epochs=6, hidden=())
    (finding,) = _base_rate(run)
    assert finding.evidence["predicts"] == "zero"
    assert "the error of predicting 0 for every input" in finding.explanation
    assert "weight_decay=50 at learning rate 0.01" in finding.explanation
    assert finding.evidence["decay_per_step"] == pytest.approx(0.5)
    (call,) = re.findall(r"keras\.optimizers\.AdamW\(([^)]*)\)", finding.remedy)
    settings = dict(part.strip().split("=") for part in call.split(","))
    fixed = keras.optimizers.AdamW(float(settings["learning_rate"]),
                                   weight_decay=float(settings["weight_decay"]))
    after = _fit(tmp_path / "fixed", x, y, fixed, epochs=6, hidden=())
    assert after.findings == []
