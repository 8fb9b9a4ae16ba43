"""NaN origin of a custom ``train_step`` with a hand-written loss, from real training runs.

Such a step never calls ``compute_loss``, so the capture takes its batch from
the step's own argument and the forensics replay the model's ``train_step``
with the optimizer's ``apply`` intercepted (`nan_origin.find_origin`'s
``via="train_step"``).
"""

from __future__ import annotations

import importlib.util
import os
import textwrap

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402
from instrumentation.nan_origin import find_origin  # noqa: E402
from tb_stability import cli  # noqa: E402
from tb_stability.analysis import analyze_logdir  # noqa: E402
from tb_stability.reader import load_run  # noqa: E402

# Written to a file so that `tb-stability replay --model FILE.py:build` can
# rebuild the same class (a saved model.keras cannot: it is not registered).
MODEL_SOURCE = textwrap.dedent('''
    import keras
    import tensorflow as tf


    class OwnLogLoss(keras.Model):
        """Keras' guide style: a hand-written binary log loss, no compute_loss."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.tracker = keras.metrics.Mean(name="tracked")

        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                p = self(x, training=True)
                loss = -tf.reduce_mean(y * tf.math.log(p) + (1 - y) * tf.math.log(1 - p))
            self.optimizer.apply(tape.gradient(loss, self.trainable_variables),
                                 self.trainable_variables)
            self.tracker.update_state(loss)
            return {"loss": loss}


    def build(kernel=0.1):
        inputs = keras.Input((4,))
        hidden = keras.layers.BatchNormalization(name="norm")(inputs)
        outputs = keras.layers.Dense(
            1, activation="sigmoid", name="out",
            kernel_initializer=keras.initializers.Constant(kernel))(hidden)
        model = OwnLogLoss(inputs, outputs)
        model.compile(keras.optimizers.SGD(1e-2))
        return model


    def build_saturated():
        return build(kernel=100.0)
''')


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model_def") / "own_log_loss.py"
    path.write_text(MODEL_SOURCE)
    return str(path)


def _module(model_file):
    spec = importlib.util.spec_from_file_location("own_log_loss_for_tests", model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _data(n=64):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 4)).astype("float32")
    return x, (x[:, :1] > 0).astype("float32")


def _fit(log_dir, model, x, y):
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False,
              callbacks=[StabilityCallback(str(log_dir), every=2)])
    records = load_run(str(log_dir)).json.get("stability/nan_origin", [])
    (report,) = analyze_logdir(str(log_dir)).runs
    return records, [f for f in report.findings if f.kind == "nan_inf"]


def test_a_hand_written_log_of_zero_is_traced_to_the_loss_and_replays(model_file, tmp_path,
                                                                      capsys):
    keras.utils.set_random_seed(0)
    x, y = _data()
    records, (finding,) = _fit(tmp_path, _module(model_file).build_saturated(), x, y)
    ((step, origin),) = records
    assert step == 0
    assert origin["origin"] == "loss" and origin["replay_with"] == "train_step"
    assert origin["layers_checked"] == 2  # the norm and the dense layer, both finite
    assert finding.evidence["origin"]["origin"] == "loss"
    with np.load(os.path.join(str(tmp_path), "nan_origin", "batch.npz")) as data:
        np.testing.assert_array_equal(data["x_0"], x[:16])
        np.testing.assert_array_equal(data["y_0"], y[:16])
    # The saved model.keras holds an unregistered class: a clear error, not a traceback.
    assert cli.main(["replay", str(tmp_path)]) == 2
    assert "Pass --model FILE.py:FUNCTION" in capsys.readouterr().err
    assert cli.main(["replay", str(tmp_path), "--model", f"{model_file}:build_saturated"]) == 0
    assert "origin=loss" in capsys.readouterr().out


def test_a_bad_label_mid_run_is_named_at_its_step(model_file, tmp_path):
    keras.utils.set_random_seed(0)
    x, y = _data()
    y[16 * 2 + 5, 0] = np.nan  # batch 2, row 5
    records, (finding,) = _fit(tmp_path, _module(model_file).build(), x, y)
    ((step, origin),) = records
    assert step == 2 and origin["origin"] == "labels"
    assert origin["nonfinite_rows"][0]["rows"] == [5]
    assert finding.first_step == 2


@pytest.mark.parametrize("via", ["train_step", "compute_loss"])
def test_the_replay_leaves_weights_statistics_metrics_and_optimizer_as_they_were(via, model_file):
    keras.utils.set_random_seed(0)
    x, y = _data(16)
    y[3, 0] = np.nan
    model = _module(model_file).build()
    if via == "compute_loss":  # the same layers in a plain model with a compiled loss and metric
        model = keras.Model(model.inputs, model.outputs)
        model.compile(keras.optimizers.SGD(1e-2), "binary_crossentropy", metrics=["mae"])
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # builds everything: one NaN step
    model.get_layer("norm").moving_mean.assign(np.full(4, 0.5, "float32"))
    for variable in model.trainable_variables:  # the NaN step's update made them NaN
        variable.assign(np.full(variable.shape, 0.1, "float32"))
    for metric in model.metrics:
        metric.reset_state()
    every = (model.trainable_variables + model.non_trainable_variables
             + model.metrics_variables + model.optimizer.variables)
    before = [np.array(v.numpy()) for v in every]
    assert find_origin(model, x, y, via=via)["origin"] == "labels"
    for variable, old in zip(every, before):
        np.testing.assert_array_equal(old, variable.numpy(), err_msg=variable.path)
