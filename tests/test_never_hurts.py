"""Instrumentation never hurts training.

* Injected failures in our own code (writer, drain, ``tf.summary``, the
  graph-side statistics, an unwritable log dir) each become exactly one
  warning, and the trained weights equal those of an uninstrumented run.
* Models we cannot fully measure (custom train step without loss hooks, no
  trainable weights, sparse gradients) train unchanged and record what can be
  measured.
* Host buffers and process memory stay bounded over 100,000 steps.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback, StabilityMonitor  # noqa: E402
from instrumentation import stats as stats_module  # noqa: E402
from instrumentation import writer as writer_module  # noqa: E402
from tb_stability.reader import LogdirReader  # noqa: E402
from tests.test_instrumentation_support import ManualStep  # noqa: E402

BATCH = 8
EPOCHS = 2
N = 48  # 6 steps per epoch


def _data(seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(N, 4).astype("float32")
    y = (x @ rng.randn(4, 1) + 0.1 * rng.randn(N, 1)).astype("float32")
    return x, y


def _model():
    init = keras.initializers.GlorotUniform
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(5, activation="tanh", kernel_initializer=init(seed=1)),
        keras.layers.Dense(1, kernel_initializer=init(seed=2)),
    ])


def _train(model_fn=_model, log_dir=None, data=_data, loss="mse", every=2, steps=EPOCHS * N // BATCH):
    """Fits a fresh model; returns (final weights, tb-stability warnings)."""
    keras.utils.set_random_seed(0)
    model = model_fn()
    model.compile(keras.optimizers.SGD(0.05), loss)
    x, y = data()
    callbacks = [StabilityCallback(str(log_dir), every=every)] if log_dir is not None else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
                  callbacks=callbacks)
    ours = [str(w.message) for w in caught if "tb-stability" in str(w.message)]
    assert int(model.optimizer.iterations.numpy()) == steps
    return [np.asarray(v) for v in model.weights], ours


def _assert_same_weights(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(a, e)


@pytest.fixture(scope="module", autouse=True)
def _no_grappler():
    """Bitwise comparisons need Grappler off.

    With Grappler on, the instrumented graph (extra consumers of the
    gradients) is rewritten differently and float32 results can differ in the
    last bit; `test_with_grappler_weights_agree_to_rounding` covers that case.
    """
    before = tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    yield
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": before})


@pytest.fixture(scope="module")
def reference():
    return _train()[0]


def _raise(*_args, **_kwargs):
    raise RuntimeError("injected failure")


class _UnwritableRecordFile:
    """Stands in for ``tf.io.TFRecordWriter`` on a disk that refuses writes."""

    def __init__(self, path, *args, **kwargs):
        self.path = path

    def write(self, record):
        raise OSError(28, "injected failure: no space left on device", self.path)

    def flush(self):
        pass

    def close(self):
        pass


FAILURES = {
    "writer": lambda mp: mp.setattr(writer_module.SummaryWriter, "write_steps", _raise),
    "drain": lambda mp: mp.setattr(writer_module.Drainer, "drain", _raise),
    "event_file": lambda mp: mp.setattr(tf.io, "TFRecordWriter", _UnwritableRecordFile),
    "graph_stats": lambda mp: mp.setattr(stats_module.StepStats, "write_row", _raise),
    "flush": lambda mp: mp.setattr(writer_module.SummaryWriter, "flush", _raise),
}


@pytest.mark.parametrize("kind", sorted(FAILURES))
def test_injected_failure_is_one_warning_and_weights_are_unchanged(tmp_path, monkeypatch,
                                                                     reference, kind):
    FAILURES[kind](monkeypatch)
    weights, ours = _train(log_dir=tmp_path / "run")
    _assert_same_weights(weights, reference)
    assert len(ours) == 1, ours
    assert "injected failure" in ours[0] and "training continues" in ours[0]


def test_unwritable_log_dir_is_one_warning_and_weights_are_unchanged(tmp_path, reference):
    blocker = tmp_path / "file_not_dir"
    blocker.write_text("x")
    weights, ours = _train(log_dir=blocker / "run")
    _assert_same_weights(weights, reference)
    assert len(ours) == 1, ours


def test_healthy_instrumentation_changes_nothing_and_warns_nothing(tmp_path, reference):
    weights, ours = _train(log_dir=tmp_path / "run")
    _assert_same_weights(weights, reference)
    assert ours == []
    run = LogdirReader().load_logdir(tmp_path / "run").runs["."]
    np.testing.assert_array_equal(run.steps["loss"].steps, np.arange(EPOCHS * N // BATCH))


def test_with_grappler_weights_agree_to_rounding(tmp_path):
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": False})
    try:
        expected, _ = _train()
        weights, ours = _train(log_dir=tmp_path / "run")
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    assert ours == []
    for a, e in zip(weights, expected):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- degraded models


def _manual_model():
    inputs = keras.Input((4,))
    init = keras.initializers.GlorotUniform(seed=3)
    return ManualStep(inputs, keras.layers.Dense(1, kernel_initializer=init)(inputs))


def test_custom_train_step_without_loss_hooks_records_its_returned_loss(tmp_path):
    expected, _ = _train(_manual_model)
    weights, ours = _train(_manual_model, log_dir=tmp_path)
    _assert_same_weights(weights, expected)
    assert ours == []
    run = LogdirReader().load_logdir(tmp_path).runs["."]
    assert np.isfinite(run.steps["loss"].values).all()
    assert np.isfinite(run.steps["grad_norm"].values).all()
    assert (run.steps["grad_norm"].values > 0).all()


def _frozen_model():
    model = _model()
    for layer in model.layers:
        layer.trainable = False
    return model


def test_model_without_trainable_weights_trains_unchanged(tmp_path):
    # Keras does not step the optimizer of a model without trainable weights.
    expected, _ = _train(_frozen_model, steps=0)
    weights, ours = _train(_frozen_model, log_dir=tmp_path / "run", steps=0)
    _assert_same_weights(weights, expected)
    assert len(ours) <= 1, ours  # at most one "cannot measure" warning, never an error


class SparseEmbedding(keras.layers.Layer):
    """A custom layer whose kernel gets `tf.IndexedSlices` gradients (``tf.gather``)."""

    def build(self, input_shape):
        self.table = self.add_weight(shape=(20, 3), initializer=keras.initializers.RandomNormal(
            seed=4), name="table")

    def call(self, ids):
        return tf.reduce_sum(tf.gather(self.table, ids), axis=1)


def _sparse_model():
    inputs = keras.Input((2,), dtype="int32")
    hidden = SparseEmbedding()(inputs)
    outputs = keras.layers.Dense(1, kernel_initializer=keras.initializers.Ones())(hidden)
    return keras.Model(inputs, outputs)


def _sparse_data():
    rng = np.random.RandomState(1)
    return rng.randint(0, 20, size=(N, 2)).astype("int32"), rng.randn(N, 1).astype("float32")


def test_sparse_gradients_are_measured(tmp_path):
    expected, _ = _train(_sparse_model, data=_sparse_data)
    weights, ours = _train(_sparse_model, log_dir=tmp_path, data=_sparse_data)
    _assert_same_weights(weights, expected)
    assert ours == []
    run = LogdirReader().load_logdir(tmp_path).runs["."]
    grad = run.steps["grad_norm"].values
    assert grad.size == EPOCHS * N // BATCH and np.isfinite(grad).all() and (grad > 0).all()
    names = list(run.variables["grad_norm"].names)
    (table,) = [i for i, name in enumerate(names) if name.endswith("/table")]
    assert (run.variables["grad_norm"].values[:, table] > 0).all()


# ------------------------------------------------------------------ bounded memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_100k_steps_keep_buffers_and_memory_bounded(tmp_path):
    every, per_call, calls = 1000, 2000, 50  # 100,000 steps
    w = tf.Variable(5.0)
    monitor = StabilityMonitor(str(tmp_path), every=every, variables=[w])

    @tf.function
    def train_many():
        for _ in tf.range(per_call):
            with tf.GradientTape() as tape:
                loss = tf.square(w - 3.0)
            (grad,) = tape.gradient(loss, [w])
            w.assign_sub(0.001 * grad)
            monitor.observe(loss, [grad], [w], learning_rate=0.001)

    sizes = []
    rss = []
    with monitor:
        for call in range(calls):
            train_many()
            monitor.tick(per_call)
            stats = monitor._stats
            sizes.append((tuple(stats.ring.shape), tuple(stats.var_stats.shape),
                          len(monitor.writer._metadata_cache)))
            if call in (9, calls - 1):
                rss.append(_rss_bytes())
    assert len(set(sizes)) == 1, "host or device buffers grew"
    assert sizes[0][0][0] == 2 * every + 1
    growth = rss[1] - rss[0]
    assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 80k steps"
    run = LogdirReader().load_logdir(tmp_path).runs["."]
    np.testing.assert_array_equal(run.steps["loss"].steps, np.arange(calls * per_call))
    assert run.variables["grad_norm"].steps.tolist() == list(range(0, calls * per_call, every))
