"""`StabilityMonitor` probes activations and records batch statistics in custom loops.

The same numpy references as the callback's probes (`test_instrumentation_probes`):
a hand-written ``tf.GradientTape`` loop must get the activation, input and label
summaries that ``model.fit`` gets, from training passes only.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityMonitor  # noqa: E402
from instrumentation import monitor_extras  # noqa: E402
from tb_stability import schema  # noqa: E402
from tb_stability.analysis import analyze_logdir  # noqa: E402
from tb_stability.reader import load_run  # noqa: E402
from tests.test_instrumentation_probes import _model, _reference, known_batch_and_model  # noqa: E402,E501
from tests.test_instrumentation_support import read_events, run_infos  # noqa: E402

LAYER_TAGS = {schema.layer_tag(q) for q in ("act_mean", "act_std", "dead_fraction",
                                              "saturated_fraction")}


def _loop(log_dir, model, optimizer, loss_fn, batches, *, every=1, jit=False,
          pass_training=True, data=True, monitor_model=True, loss=None, between=None):
    """Trains on ``batches`` with a monitor; ``between(i)`` runs after step ``i``."""
    monitor = StabilityMonitor(str(log_dir), every=every, optimizer=optimizer, jit_compile=jit,
                               model=model if monitor_model else None, loss=loss)

    @tf.function(jit_compile=jit)
    def step(xb, yb):
        with tf.GradientTape() as tape:
            pred = model(xb, training=True) if pass_training else model(xb)
            value = loss_fn(yb, pred)
        grads = tape.gradient(value, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        if data:
            monitor.observe(value, grads, model.trainable_variables,
                            inputs=xb, labels=yb, predictions=pred)
        else:
            monitor.observe(value, grads, model.trainable_variables)
        return value

    with monitor:
        for i, (xb, yb) in enumerate(batches):
            step(xb, yb)
            monitor.tick()
            if between is not None:
                between(i)
    return monitor


@pytest.mark.parametrize("kind,jit,pass_training", [
    ("sequential", False, True), ("sequential", True, True), ("functional", False, True),
    ("subclassed", False, False)],
    ids=["sequential", "sequential-xla", "functional", "subclassed-no-training-arg"])
def test_custom_loop_probes_match_numpy_reference(kind, jit, pass_training, tmp_path):
    """Frozen weights (rate 0): every step's probes are those of the known weights."""
    x, y, model, weights = known_batch_and_model(kind)
    model.set_weights(weights)
    _loop(tmp_path, model, keras.optimizers.SGD(0.0), keras.losses.MeanSquaredError(),
          [(x, y)] * 3, jit=jit, pass_training=pass_training)
    run = load_run(str(tmp_path))
    ref = _reference(weights, x.astype(np.float64))
    mean, std = run.layers["act_mean"], run.layers["act_std"]
    assert list(mean.steps) == [0, 1, 2]
    assert set(mean.names) == set(ref)
    for name, expected in ref.items():
        j = mean.names.index(name)
        np.testing.assert_allclose(mean.values[:, j], expected["mean"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(std.values[:, j], expected["std"], rtol=1e-3, atol=1e-5)
    dead = run.layers["dead_fraction"]
    assert sorted(dead.names) == ["relu_dense", "relu_layer"]
    for name in dead.names:
        assert dead.values[0, dead.names.index(name)] == pytest.approx(ref[name]["dead"])
    sat = run.layers["saturated_fraction"]
    for name in sat.names:
        assert sat.values[0, sat.names.index(name)] == pytest.approx(ref[name]["sat"], abs=1e-6)
    for row, fn in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max)):
        np.testing.assert_allclose(run.inputs[row].values[0], fn(x, axis=0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(run.targets[row].values[0], fn(y, axis=0), rtol=1e-4,
                                   atol=1e-5)
    (info,) = run_infos(read_events(tmp_path))
    assert sorted(info["probed_layers"]) == sorted(ref)
    assert info["model_class"] == type(model).__name__
    assert info["batch_size"] == 32 and info["probe_every"] == 1


def test_evaluation_and_eager_calls_are_not_probed_and_the_model_is_restored(tmp_path):
    """Probe steps are exactly the training steps on the schedule; other calls of the
    model (a traced evaluation at a probe step's counter, an eager call) write nothing."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 3)).astype("float32")
    y = rng.standard_normal((64, 1)).astype("float32")
    model = _model("sequential")
    model(x[:1])
    original_call = model.call

    @tf.function
    def evaluate(xb):
        return model(xb * 100.0, training=False)

    def between(i):
        evaluate(x)  # the counter is i + 1 here: a probe step when i + 1 is even
        model(x * 100.0, training=True)  # eager

    _loop(tmp_path, model, keras.optimizers.SGD(0.01), keras.losses.MeanSquaredError(),
          [(x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)], every=2, between=between)
    events = read_events(tmp_path)
    for tag in LAYER_TAGS:
        assert [e.step for e in events[(".", tag)]] == [0, 2, 4, 6]
    assert [e.step for e in events[(".", schema.TAG_INPUTS)]] == [0, 2, 4, 6]
    run = load_run(str(tmp_path))
    np.testing.assert_allclose(run.inputs["max"].values[1], x[16:24].max(axis=0), rtol=1e-5)
    assert "call" not in vars(model) and model.call == original_call
    assert model.layers[0].get_config()["activation"] == "relu"


def test_class_counts_and_the_loss_of_an_uncompiled_model(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)).astype("float32")
    y = np.array([0, 1, 2, 2] * 16, "int32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    first = np.bincount(model(x).numpy().argmax(axis=1), minlength=3)
    _loop(tmp_path, model, keras.optimizers.Adam(1e-3), loss_fn, [(x, y)] * 2, loss=loss_fn)
    events = read_events(tmp_path)
    # The softmax output is the only probed layer: no dead or saturated fraction for it.
    assert set(events) == {(".", tag) for tag in (
        schema.TAG_STEPS, schema.TAG_RUN_INFO, schema.TAG_INPUTS, schema.TAG_LABELS,
        schema.TAG_PREDICTIONS, schema.layer_tag("act_mean"), schema.layer_tag("act_std"))} | {
        (".", schema.variable_tag(q)) for q in schema.VARIABLE_QUANTITIES}
    run = load_run(str(tmp_path))
    np.testing.assert_array_equal(run.labels.values[0], [16, 16, 32])
    np.testing.assert_array_equal(run.predictions.values[0], first)
    (info,) = run_infos(events)
    assert info["loss_name"] == "sparse_categorical_crossentropy"
    assert info["output_activation"] == "softmax" and info["label_max"] == 2.0
    assert info["model_class"] == "Sequential"


def test_without_a_model_the_batch_statistics_are_still_recorded(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3)).astype("float32")
    y = (x @ np.array([[1.0], [2.0], [-1.0]], "float32")) * 10 + 5
    model = _model("functional")
    _loop(tmp_path, model, keras.optimizers.SGD(0.01), keras.losses.MeanSquaredError(),
          [(x, y)] * 2, monitor_model=False)
    events = read_events(tmp_path)
    assert not {(".", tag) for tag in LAYER_TAGS} & set(events)
    assert {(".", schema.TAG_INPUTS), (".", schema.TAG_TARGETS)} <= set(events)
    run = load_run(str(tmp_path))
    np.testing.assert_allclose(run.targets["mean"].values[0], y.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(run.targets["std"].values[0], y.std(axis=0), rtol=1e-4)


def test_custom_loop_findings_name_unscaled_inputs_and_a_saturated_layer(tmp_path):
    """The findings `model.fit` gets from its probes, from a hand-written loop."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1024, 5)).astype("float32")
    x[:, 0] *= 1000.0
    y = (x[:, 1] + x[:, 2] > 0).astype("int32")
    model = keras.Sequential([keras.Input((5,)),
                              keras.layers.Dense(16, activation="sigmoid", name="squashed"),
                              keras.layers.Dense(2, activation="softmax")])
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    _loop(tmp_path, model, keras.optimizers.Adam(1e-3), loss_fn,
          [(x[i:i + 32], y[i:i + 32]) for i in range(0, 1024, 32)] * 2, every=4, loss=loss_fn)
    found = {f.kind: f for run in analyze_logdir(str(tmp_path)).runs for f in run.findings}
    assert "x[0]" in found["unscaled_inputs"].explanation
    assert found["saturated_activations"].layers == ["squashed"]


def test_a_probe_failure_warns_once_and_the_statistics_go_on(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3)).astype("float32")
    y = rng.standard_normal((32, 1)).astype("float32")
    model = _model("sequential")
    model(x[:1])

    def broken(self):
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(monitor_extras.ActivationProbes, "begin_step", broken)
    with pytest.warns(RuntimeWarning, match="activation probes and batch statistics disabled"):
        _loop(tmp_path, model, keras.optimizers.SGD(0.01), keras.losses.MeanSquaredError(),
              [(x, y)] * 3)
    events = read_events(tmp_path)
    assert len({int(s) for e in events[(".", schema.TAG_STEPS)] for s in e.value[:, 0]}) == 3
    assert not {(".", tag) for tag in LAYER_TAGS} & set(events)
    assert "call" not in vars(model)


def test_an_eager_loop_with_numpy_batches_gets_its_batch_statistics(tmp_path):
    """Without ``tf.function`` nothing is traced: no probes, but the inputs and labels
    ``observe`` is given (numpy arrays here) are recorded."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(1)])
    optimizer, loss_fn = keras.optimizers.SGD(0.01), keras.losses.MeanSquaredError()
    with StabilityMonitor(str(tmp_path), every=2, optimizer=optimizer, model=model) as monitor:
        for i in range(0, 64, 16):
            xb, yb = x[i:i + 16], y[i:i + 16]
            with tf.GradientTape() as tape:
                pred = model(xb, training=True)
                value = loss_fn(yb, pred)
            grads = tape.gradient(value, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            monitor.observe(value, grads, model.trainable_variables, inputs=xb, labels=yb,
                            predictions=pred)
            monitor.tick()
    run = load_run(str(tmp_path))
    assert list(run.inputs["mean"].steps) == [0, 2]
    np.testing.assert_allclose(run.inputs["min"].values[1], x[32:48].min(axis=0), rtol=1e-6)
    np.testing.assert_allclose(run.targets["max"].values[0], y[:16].max(axis=0), rtol=1e-6)
    assert not run.layers


@pytest.mark.parametrize("label_shape", ["flat", "column"])
def test_labels_broadcast_against_predictions_in_a_hand_written_loss(tmp_path, label_shape):
    """``(64,) - (64, 1)`` is ``(64, 64)``: the model can only learn the labels' mean. The
    base-rate finding names the shapes and reshapes the labels; the same loop with labels of
    the predictions' shape learns and gets no finding."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 6)).astype("float32")
    y = (x @ rng.standard_normal(6) * 2 + 1).astype("float32")
    if label_shape == "column":
        y = y.reshape(-1, 1)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(1)])

    def mse(y_true, y_pred):
        return tf.reduce_mean(tf.square(y_true - y_pred))

    _loop(tmp_path, model, keras.optimizers.Adam(1e-3), mse,
          [(x[i:i + 64], y[i:i + 64]) for i in range(0, 2048, 64)] * 5, every=20, loss=mse)
    (report,) = analyze_logdir(str(tmp_path)).runs
    (info,) = run_infos(read_events(tmp_path))
    assert info["prediction_shape"] == [64, 1]
    stalled = [f for f in report.findings if f.kind == "stalled"]
    if label_shape == "column":
        assert info["label_shape"] == [64, 1] and not stalled
        return
    assert info["label_shape"] == [64]
    (finding,) = stalled
    assert finding.evidence["broadcast_shape"] == [64, 64]
    assert "broadcasts them to (64, 64)" in finding.explanation
    assert "y = tf.reshape(y, (-1, 1))" in finding.remedy
