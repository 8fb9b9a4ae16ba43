"""StabilityCallback on models that override ``train_step``, from real training runs.

Keras' own guide overrides ``train_step`` with a hand-written loss (no
``compute_loss``), a loss tracker's running mean, or a GAN's two optimizers.
None of these may produce a false finding: a loss the instrumentation cannot
see is taken from the step's returned logs where that is the step's own value,
left out where it is a running mean, and a step that never calls
``model.optimizer.apply`` says so instead of reporting a healthy run.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402
from tb_stability.analysis import analyze_logdir  # noqa: E402
from tb_stability.reader import load_run  # noqa: E402


def _cross_entropy(model, x, y):
    logits = model(x, training=True)
    return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))


class OwnLoss(keras.Model):
    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = _cross_entropy(self, x, y)
        self.optimizer.apply(tape.gradient(loss, self.trainable_variables), self.trainable_variables)
        return {"loss": loss}


class TrackedLoss(keras.Model):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tracker = keras.metrics.Mean(name="loss")

    @property
    def metrics(self):
        return [self.tracker]

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = _cross_entropy(self, x, y)
        self.optimizer.apply(tape.gradient(loss, self.trainable_variables), self.trainable_variables)
        self.tracker.update_state(loss)
        return {"loss": self.tracker.result()}


class TwoOptimizers(keras.Model):
    def __init__(self):
        super().__init__()
        self.first = keras.layers.Dense(16, activation="relu")
        self.second = keras.layers.Dense(3)

    def call(self, x):
        return self.second(self.first(x))

    def compile(self, first_opt, second_opt):
        super().compile()
        self.first_opt, self.second_opt = first_opt, second_opt

    def train_step(self, data):
        x, y = data
        with tf.GradientTape(persistent=True) as tape:
            loss = _cross_entropy(self, x, y)
        for layer, opt in ((self.first, self.first_opt), (self.second, self.second_opt)):
            opt.apply(tape.gradient(loss, layer.trainable_variables), layer.trainable_variables)
        return {"loss": loss}


class BatchLosses(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def _functional(cls):
    inputs = keras.Input((8,))
    outputs = keras.layers.Dense(3)(keras.layers.Dense(16, activation="relu")(inputs))
    return cls(inputs, outputs)


def _fit(model, tmp_path, every=10):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8)).astype("float32")
    y = rng.integers(0, 3, 256)
    batches = BatchLosses()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False,
                  callbacks=[StabilityCallback(str(tmp_path), every=every), batches])
    ours = [str(w.message) for w in caught if "tb-stability" in str(w.message)]
    return batches.losses, ours


def test_a_hand_written_loss_is_recorded_from_the_returned_logs(tmp_path):
    keras.utils.set_random_seed(0)
    model = _functional(OwnLoss)
    model.compile("adam")
    losses, ours = _fit(model, tmp_path)
    assert ours == []
    run = load_run(str(tmp_path))
    assert run.steps["loss"].values.tolist() == pytest.approx(losses, rel=1e-6)
    assert run.json["stability/run_info"][-1][1]["loss_source"] == "train_step"
    (report,) = analyze_logdir(str(tmp_path)).runs
    assert report.findings == [] and report.warnings == []


def test_a_running_mean_is_left_out_not_recorded_as_a_nan_loss(tmp_path):
    keras.utils.set_random_seed(0)
    model = _functional(TrackedLoss)
    model.compile("adam")
    _, ours = _fit(model, tmp_path, every=4)
    (warning,) = ours
    assert "running mean" in warning and "self.compute_loss" in warning
    run = load_run(str(tmp_path))
    assert "loss" not in run.steps
    grad = run.steps["grad_norm"].values
    assert grad.size == 16 and np.isfinite(grad).all() and (grad > 0).all()
    assert run.json["stability/run_info"][-1][1]["loss_source"] == "none"
    (report,) = analyze_logdir(str(tmp_path)).runs
    assert report.findings == [] and report.warnings == []  # no NaN "loss"


def test_a_train_step_with_optimizers_of_its_own_says_nothing_was_recorded(tmp_path):
    keras.utils.set_random_seed(0)
    model = TwoOptimizers()
    model.compile(keras.optimizers.Adam(1e-3), keras.optimizers.SGD(1e-2))
    losses, ours = _fit(model, tmp_path)
    assert len(losses) == 16 and np.isfinite(losses).all()  # training itself unharmed
    (warning,) = ours
    assert "never calls model.optimizer.apply" in warning and "StabilityMonitor" in warning
    (report,) = analyze_logdir(str(tmp_path)).runs
    assert not report.instrumented and report.findings == []
    (note,) = report.warnings
    assert "recorded no statistics" in note and "StabilityMonitor" in note


def test_a_hand_written_loss_still_records_the_input_statistics(tmp_path):
    """Without compute_loss the batch comes from train_step's own argument."""
    keras.utils.set_random_seed(0)
    model = _functional(OwnLoss)
    model.compile("adam")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8)).astype("float32")
    x[:, 3] = 1000.0 + 500.0 * x[:, 3]  # one feature left unscaled
    y = rng.integers(0, 3, 256)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False,
                  callbacks=[StabilityCallback(str(tmp_path), every=4)])
    assert [str(w.message) for w in caught if "tb-stability" in str(w.message)] == []
    run = load_run(str(tmp_path))
    means = run.inputs["mean"]
    assert means.steps.tolist() == list(range(0, 16, 4))
    assert means.names[3] == "x[3]"
    np.testing.assert_allclose(means.values[0], x[:32].mean(axis=0), rtol=1e-4, atol=1e-4)
    (report,) = analyze_logdir(str(tmp_path)).runs
    assert [f.kind for f in report.findings] == ["unscaled_inputs"]
    assert "x[3]" in report.findings[0].explanation
