"""Inputs far below unit scale, from real fits: pixels divided by 255 twice.

A pipeline that divides by 255 feeding a model with ``Rescaling(1 / 255)``
hands the first convolution values up to 1/255: the small CNN below ended at
the labels' entropy, and the report blamed the label pairing ("print(x[:5],
y[:5])") and the initialisation of dead units. It now names the double
scaling, and its remedy (raw pixels into the same model) trains.
"""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402
from tb_stability.analysis import analyze_logdir  # noqa: E402


def _pixels():
    rng = np.random.default_rng(0)  # bright images against dark ones
    brightness = rng.uniform(0.2, 0.8, size=(1024, 1, 1, 1))
    noise = 0.2 * rng.normal(size=(1024, 12, 12, 1))
    x = np.round(255 * np.clip(brightness + noise, 0, 1)).astype("float32")
    return x, (brightness[:, 0, 0, 0] > 0.5).astype("float32")


def _fit(logdir, x, y, rescaling=True):
    keras.utils.set_random_seed(0)
    head = [keras.layers.Rescaling(1 / 255.0)] if rescaling else []
    model = keras.Sequential([keras.Input(x.shape[1:])] + head + [
        keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.Flatten(),
        keras.layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, batch_size=32, epochs=4, validation_split=0.2, verbose=0,
                        callbacks=[StabilityCallback(str(logdir), every=10)])
    (run,) = analyze_logdir(str(logdir)).runs
    return run, history.history["val_accuracy"][-1]


def test_pixels_scaled_twice_are_named_and_scaling_once_trains(tmp_path):
    x, y = _pixels()
    run, accuracy = _fit(tmp_path / "twice", x / 255.0, y)
    loud = [f for f in run.findings if f.severity != "info"]
    assert [(f.kind, f.severity) for f in loud] == [("unscaled_inputs", "warning")], run.findings
    (finding,) = loud
    assert finding.evidence["tiny"] and finding.evidence["max_abs_input"] <= 1 / 255.0 + 1e-6
    (layer,) = finding.evidence["scaled_twice_by"]
    assert layer.startswith("Rescaling 'rescaling")  # 'rescaling_1' after other models
    assert "scaled twice" in finding.explanation and "x / 255.0" in finding.remedy
    for consequence in (f for f in run.findings if f.severity == "info"):
        assert consequence.evidence["consequence_of"] == "unscaled_inputs", consequence.kind
        assert consequence.remedy.startswith("Fix the input scale first")

    fixed, fixed_accuracy = _fit(tmp_path / "once", x, y)  # raw pixels, as the remedy says
    assert [f for f in fixed.findings if f.kind == "unscaled_inputs"] == [], fixed.findings
    assert fixed_accuracy > accuracy + 0.1


def test_tiny_features_without_a_scaling_layer_are_told_to_standardise(tmp_path):
    x, y = _pixels()
    run, _ = _fit(tmp_path / "tiny", x / 255.0 / 255.0, y, rescaling=False)
    (finding,) = [f for f in run.findings if f.kind == "unscaled_inputs"]
    assert finding.evidence["scaled_twice_by"] == [] and "scaled twice" not in finding.explanation
    assert "norm.adapt(x_train)" in finding.remedy
