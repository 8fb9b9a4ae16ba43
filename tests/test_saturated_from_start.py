"""Layers saturated before any update: the initial weights, not the inputs or the training.

A deep tanh MLP whose kernels start at RandomNormal(stddev=1.5) (8x the Glorot
scale for 64 inputs) on standardised inputs was told to "scale the inputs,
normalise before the activation, or switch to ReLU".
"""

import numpy as np
import pytest

from tb_stability.analysis import analyze_logdir, report_to_json

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


def _fit(logdir, initializer="glorot_uniform", input_scale=1.0):
    from instrumentation import StabilityCallback

    data = np.random.default_rng(0)
    x = data.normal(size=(2048, 20)).astype("float32")
    y = np.tanh(x @ data.normal(size=(20, 1)) / 2).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((20,))]
                             + [keras.layers.Dense(64, activation="tanh", kernel_initializer=initializer)
                                for _ in range(6)] + [keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.05), "mse")
    history = model.fit(x * input_scale, y, batch_size=64, epochs=3, verbose=0,
                        callbacks=[StabilityCallback(str(logdir), every=10)])
    report = analyze_logdir(str(logdir))
    return {f.kind: f for r in report.runs for f in r.findings}, history.history["loss"][-1], report


def test_kernels_initialised_too_wide_are_named_and_the_default_initialiser_trains(tmp_path):
    found, wide_loss, report = _fit(tmp_path / "wide", keras.initializers.RandomNormal(stddev=1.5))
    sat = found["saturated_activations"]
    assert "already did at step 0, before any update" in sat.explanation, report_to_json(report)
    assert len(sat.evidence["saturated_at_first_step"]) == len(sat.layers) == 6
    assert "start from smaller weights" in sat.remedy and "switch to ReLU" not in sat.remedy
    assert "keras.layers.Dense(64, activation='tanh')" in sat.remedy
    found, loss, report = _fit(tmp_path / "default")  # the remedy's layer: Keras' default initialiser
    assert "saturated_activations" not in found, report_to_json(report)
    assert loss < 0.5 * wide_loss


def test_layers_saturated_by_unscaled_inputs_are_not_blamed_on_the_initialiser(tmp_path):
    found, _, report = _fit(tmp_path / "run", input_scale=300.0)
    assert "unscaled_inputs" in found, report_to_json(report)
    sat = found["saturated_activations"]
    assert "before any update" not in sat.explanation and "saturated_at_first_step" not in sat.evidence
    assert "scale the inputs" in sat.remedy
