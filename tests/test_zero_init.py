"""Kernels initialised to zero: nothing ever gets a gradient, and no learning rate helps.

With ``kernel_initializer="zeros"`` a tanh MLP's kernels got no gradient at all
(the report said "not connected to the loss ... or behind dead units" and only
warned), and a ReLU layer was 100% dead with a remedy that lowered the learning
rate. Checked on real fits: the report names the zero kernels, says nothing can
learn, and its initialiser, used as written, trains the same model.
"""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402
from tb_stability.analysis import analyze_logdir, report_to_json  # noqa: E402


def _fit(logdir, initializer, activation="tanh", classes=0):
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    x = rng.normal(size=(1024, 10)).astype("float32")
    if classes:
        y = np.argmax(x[:, :classes], axis=1)
        loss, units = keras.losses.SparseCategoricalCrossentropy(from_logits=True), classes
    else:
        y = (x @ rng.normal(size=(10, 1))).astype("float32")
        loss, units = "mse", 1
    model = keras.Sequential([keras.Input((10,))] + [
        keras.layers.Dense(32, activation=activation, kernel_initializer=initializer)
        for _ in range(2)] + [keras.layers.Dense(units, kernel_initializer=initializer)])
    model.compile("adam", loss)
    history = model.fit(x, y, batch_size=32, epochs=6, verbose=0,
                        callbacks=[StabilityCallback(str(logdir), every=10)])
    (run,) = analyze_logdir(str(logdir)).runs
    return run, history.history["loss"]


def test_zero_kernels_get_no_gradient_and_the_remedy_initialises_them(tmp_path):
    run, losses = _fit(tmp_path / "zeros", "zeros")
    loud = [f for f in run.findings if f.severity != "info"]
    assert [(f.kind, f.severity) for f in loud] == [("update_ratio_low", "critical")], run.findings
    (finding,) = loud
    kernels = [name for name in finding.layers if name.endswith("/kernel")]
    assert len(kernels) == 3 and finding.evidence["zero_kernels"] == kernels
    assert "initialised to zero" in finding.explanation
    assert "learning_rate" not in finding.remedy and "not connected" not in finding.remedy

    initializer = finding.remedy.split("kernel_initializer='", 1)[1].split("'", 1)[0]
    assert initializer == "glorot_uniform"
    fixed, fixed_losses = _fit(tmp_path / "fixed", initializer)
    assert [f for f in fixed.findings if f.severity != "info"] == [], fixed.findings
    assert fixed_losses[-1] < 0.1 * losses[-1]


def test_a_relu_layer_dead_from_zero_kernels_is_not_told_to_lower_the_rate(tmp_path):
    run, _ = _fit(tmp_path / "relu", "zeros", activation="relu", classes=4)
    dead = [f for f in run.findings if f.kind == "dead_units"]
    assert [f.severity for f in dead] == ["critical"], report_to_json(analyze_logdir(str(tmp_path)))
    assert dead[0].evidence["zero_kernels"]
    assert "initialised to zero" in dead[0].explanation
    assert "he_normal" in dead[0].remedy and "optimizer" not in dead[0].remedy


class _ZeroDense(keras.layers.Layer):
    """A hand-written dense ReLU layer whose weights start at zero (the user's mistake)."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1], 64), initializer="zeros", name="kernel")
        self.b = self.add_weight(shape=(64,), initializer="zeros", name="bias")

    def call(self, x):
        return tf.nn.relu(x @ self.w + self.b)


def test_a_custom_layer_initialised_to_zero_explains_the_collapse_to_one_class(tmp_path):
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    x = rng.normal(size=(2048, 20)).astype("float32")
    y = np.argmax(x[:, :4] + 0.3 * rng.normal(size=(2048, 4)), axis=1)
    model = keras.Sequential([keras.Input((20,)), _ZeroDense(), keras.layers.Dense(4)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=3, validation_split=0.2, verbose=0,
              callbacks=[StabilityCallback(str(tmp_path), every=10)])
    (run,) = analyze_logdir(str(tmp_path)).runs
    loud = [f for f in run.findings if f.severity != "info"]
    assert [(f.kind, f.severity) for f in loud] == [("update_ratio_low", "critical")], run.findings
    (kernel,) = loud[0].evidence["zero_kernels"]
    assert kernel.endswith(f"/{model.layers[0].name}/kernel")
    quiet = {f.kind: f for f in run.findings if f.severity == "info"}
    assert "class_imbalance" in quiet and "prediction_share" in quiet["class_imbalance"].evidence
    for finding in quiet.values():
        assert finding.evidence["consequence_of"] == "update_ratio_low", finding.kind
        assert finding.remedy.startswith("Fix the initialisation first")
