"""A NaN one computation made, an explosion's casualties, a stall with no ReLU to kill.

Real fits under `StabilityCallback`, then the report:

* a custom Gaussian negative log-likelihood whose variance comes from a
  linear output (log of a negative number at the first step), and a custom
  layer that standardises each feature by its batch spread while one feature
  is constant (0/0 at the first step): no update made these NaNs, so the
  remedy guards the computation and does not lower the learning rate;
* Adam at 0.2 on a ReLU MLP: the gradients explode and kill most units of a
  layer, which is told as a consequence of the explosion;
* a tanh MLP whose loss is scaled down 1e4x barely moves at a large learning rate:
  with no ReLU unit to kill, lowering the rate is not the advice.
"""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402
from tb_stability.analysis import analyze_logdir  # noqa: E402


def _fit(logdir, model, x, y, epochs, **fit):
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0,
              callbacks=[StabilityCallback(str(logdir))], **fit)
    (run,) = analyze_logdir(str(logdir)).runs
    return run


def _one(run, kind):
    found = [f for f in run.findings if f.kind == kind]
    assert len(found) == 1, [(f.kind, f.severity) for f in run.findings]
    return found[0]


def _regression(rng, n=1024, d=8):
    x = rng.standard_normal((n, d)).astype("float32")
    y = (x @ rng.standard_normal((d, 1)) + 0.3 * rng.standard_normal((n, 1))).astype("float32")
    return x, y


def test_a_custom_nll_on_a_linear_variance_is_told_to_keep_it_positive(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = _regression(np.random.default_rng(0))

    def nll(y_true, y_pred):  # the second output is the variance, from a linear unit
        mean, var = y_pred[:, :1], y_pred[:, 1:]
        return tf.reduce_mean(0.5 * tf.math.log(var) + 0.5 * tf.square(y_true - mean) / var)

    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(32, activation="relu")(inputs)
    output = keras.layers.Dense(2, name="mean_and_var")(hidden)
    model = keras.Model(inputs, output)
    model.compile(keras.optimizers.Adam(1e-3), nll)
    nan = _one(_fit(tmp_path, model, x, y, epochs=1), "nan_inf")
    assert nan.first_step == 0 and nan.evidence["origin"]["origin"] == "loss"
    assert "before any update could have caused it" in nan.explanation
    assert "The custom loss `nll`" in nan.remedy
    assert "mean_and_var is linear" in nan.remedy and "softplus" in nan.remedy
    assert "learning_rate" not in nan.remedy and "clipnorm" not in nan.remedy


class Standardise(keras.layers.Layer):
    """Each feature over the batch: (x - mean) / std, unguarded."""

    def call(self, x):
        return (x - tf.reduce_mean(x, 0)) / tf.math.reduce_std(x, 0)


def test_a_standardisation_of_a_constant_feature_is_guarded_not_clipped(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((512, 6)).astype("float32")
    x[:, 5] = 1.0  # a constant column: std 0
    y = (x[:, :1] > 0).astype("float32")
    model = keras.Sequential([keras.Input((6,)), Standardise(name="standardise"),
                              keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy")
    run = _fit(tmp_path, model, x, y, epochs=1)
    nan = _one(run, "nan_inf")
    # Where a ReLU maps NaN to 0 the crossentropy clips its input and the loss stays finite
    # while the gradients do not; where oneDNN's fused kernels pass NaN on (no AVX-512) the
    # loss is NaN too. Either way the origin is the same layer.
    assert nan.evidence["loss_at_onset"] is not None
    assert nan.evidence["origin"]["layer"] == "standardise"
    assert "first non-finite output in layer standardise, from finite inputs" in nan.explanation
    assert "(x[5] = 1)" in nan.explanation and "0/0" in nan.explanation
    assert nan.remedy.startswith("Guard the computation in layer standardise")
    assert "(std + 1e-6)" in nan.remedy
    assert "Clip gradients" not in nan.remedy and "clipnorm" not in nan.remedy
    assert all(f.severity == "info" for f in run.findings if f is not nan)


def test_units_an_exploding_update_killed_are_its_consequence(tmp_path):
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(0)
    x, y = _regression(rng, n=4096, d=20)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(128, activation="relu"),
                              keras.layers.Dense(128, activation="relu"), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(0.2), "mse")
    run = _fit(tmp_path, model, x, y, epochs=8)
    explosion = _one(run, "exploding_gradients")
    dead = _one(run, "dead_units")
    assert explosion.severity == "critical"
    assert dead.first_step >= explosion.first_step
    assert dead.severity == "info" and dead.evidence["consequence_of"] == "exploding_gradients"
    assert dead.remedy.startswith("Fix the exploding gradients first:\n" + explosion.remedy)


@pytest.mark.parametrize("activation, lowered", [
    pytest.param("tanh", False, id="tanh-keeps-the-rate"),
    pytest.param("relu", True, id="relu-may-have-died-of-it"),
])
def test_tiny_updates_from_a_scaled_down_loss_lower_the_rate_only_with_relu_units(
        tmp_path, activation, lowered):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2048, 20)).astype("float32")
    y = (x[:, :3].sum(1) > 0).astype("float32")[:, None]
    model = keras.Sequential([keras.Input((20,))]
                             + [keras.layers.Dense(64, activation=activation) for _ in range(3)]
                             + [keras.layers.Dense(1, activation="sigmoid")])
    model.compile(keras.optimizers.SGD(0.05), "binary_crossentropy", loss_weights=[1e-4])
    low = _one(_fit(tmp_path, model, x, y, epochs=4), "update_ratio_low")
    assert "The learning rate is already 0.05" in low.remedy
    assert ("learning_rate=0.005" in low.remedy) == lowered
    assert ("a loss scaled far down" in low.remedy) == (not lowered)
