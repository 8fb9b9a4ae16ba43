"""A variable the loss does not reach is named as such, from real training runs.

Keras only warns "Gradients do not exist for variables ..." once per trace; the
report must not read the variable's zero gradient as a learning rate that is
too low, nor as gradients vanishing through depth.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback, StabilityMonitor  # noqa: E402
from tb_stability.analysis import analyze_logdir  # noqa: E402


class BuiltButNeverCalled(keras.Model):
    def __init__(self):
        super().__init__()
        self.extra = keras.layers.Dense(16, activation="relu")  # the user's mistake
        self.hidden = keras.layers.Dense(16, activation="relu")
        self.out = keras.layers.Dense(3)

    def call(self, x, training=False):
        return self.out(self.hidden(x))


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((512, 8)).astype("float32"), rng.integers(0, 3, 512)


def _only_finding(tmp_path):
    (run,) = analyze_logdir(str(tmp_path)).runs
    assert run.warnings == []
    assert [f.kind for f in run.findings] == ["update_ratio_low"], run.findings
    return run.findings[0]


def test_a_layer_built_but_never_called_is_named_not_given_a_learning_rate(tmp_path):
    keras.utils.set_random_seed(0)
    model = BuiltButNeverCalled()
    model.extra.build((None, 8))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    model.fit(x, y, batch_size=32, epochs=3, verbose=0,
              callbacks=[StabilityCallback(str(tmp_path), every=10)])
    finding = _only_finding(tmp_path)  # and no vanishing_gradients
    (name,) = finding.layers
    assert name.endswith("/kernel") and name == finding.evidence["no_gradient"][0]
    assert "median_ratio" not in finding.evidence
    assert "no gradient at all" in finding.explanation
    assert "learning_rate" not in finding.remedy and "trainable = False" in finding.remedy


def test_a_none_gradient_in_a_custom_loop_is_named_not_given_a_learning_rate(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(16, activation="relu")(inputs)))
    unused = keras.layers.Dense(4, name="unused")
    unused.build((None, 8))
    variables = model.trainable_variables + unused.trainable_variables
    optimizer = keras.optimizers.Adam(1e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    monitor = StabilityMonitor(str(tmp_path), every=10, optimizer=optimizer, model=model)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, variables)
        assert grads[-1] is None
        optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
        monitor.observe(loss, grads, variables)

    x, y = _data(1)
    with monitor:
        for i in range(40):
            train_step(x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8])
            monitor.tick()
    finding = _only_finding(tmp_path)
    assert finding.layers == ["unused/kernel"] == finding.evidence["no_gradient"]


def test_a_learning_rate_too_low_is_still_one_beside_a_variable_without_gradient(tmp_path):
    keras.utils.set_random_seed(0)
    model = BuiltButNeverCalled()
    model.extra.build((None, 8))
    model.compile(keras.optimizers.SGD(1e-6), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data(2)
    model.fit(x, y, batch_size=32, epochs=3, verbose=0,
              callbacks=[StabilityCallback(str(tmp_path), every=10)])
    (run,) = analyze_logdir(str(tmp_path)).runs
    (finding,) = [f for f in run.findings if f.kind == "update_ratio_low"]
    assert len(finding.evidence["no_gradient"]) == 1
    assert len(finding.evidence["median_ratio"]) == 2  # hidden and out kernels
    assert set(finding.layers) == set(finding.evidence["median_ratio"]) | set(finding.evidence["no_gradient"])
    assert "keras.optimizers.SGD(learning_rate=" in finding.remedy
    assert "trainable = False" in finding.remedy


def test_kernels_behind_a_saturated_recurrent_layer_are_not_called_unconnected(tmp_path):
    """A GRU fed raw values in the tens of thousands: its gates sit where the derivative is exactly 0
    in float32, so its kernels get a gradient of exactly 0. The cause is the saturation (and the
    unscaled inputs behind it), not a layer the loss does not reach."""
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    base = rng.normal(size=(1024, 1, 1)) * 3000 + 20000
    x = (base + np.cumsum(rng.normal(size=(1024, 20, 1)) * 200, axis=1)).astype("float32")
    y = ((x[:, -1, 0] - x[:, 0, 0]) / 1000).astype("float32")[:, None]
    model = keras.Sequential([keras.Input((20, 1)), keras.layers.GRU(32), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    model.fit(x, y, batch_size=32, epochs=3, validation_split=0.2, verbose=0,
              callbacks=[StabilityCallback(str(tmp_path), every=10)])
    (run,) = analyze_logdir(str(tmp_path)).runs
    loud = sorted(f.kind for f in run.findings if f.severity != "info")
    assert loud == ["saturated_activations", "unscaled_inputs"], run.findings
    (low,) = [f for f in run.findings if f.kind == "update_ratio_low"]
    assert low.severity == "info" and low.evidence["consequence_of"] == "saturated_activations"
    gru = model.layers[0].name  # 'gru', or 'gru_1' after other models in this process
    assert all(f"/{gru}/" in name for name in low.evidence["no_gradient"])
    assert low.remedy.startswith(f"Fix the saturation in {gru} first")
    assert "not connected" not in low.remedy
