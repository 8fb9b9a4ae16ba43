"""config_mismatch: output activation vs loss vs labels, recorded in run_info."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402
from instrumentation.config_check import check_config, classification_mode  # noqa: E402
from tb_stability.analysis import analyze_logdir  # noqa: E402
from tb_stability.detectors.config import config_problems  # noqa: E402


def _model(units, activation, loss):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu"),
                              keras.layers.Dense(units, activation=activation)])
    model.compile("adam", loss)
    return model


def _messages(info):
    return " | ".join(p["message"] for p in config_problems(info))


def test_healthy_pairings_have_no_problem():
    for units, act, loss, labels in [
        (1, "sigmoid", "binary_crossentropy", (0, 1)),
        (3, "softmax", "sparse_categorical_crossentropy", (0, 2)),
        (3, "softmax", "categorical_crossentropy", (0, 1)),
        (1, None, keras.losses.BinaryCrossentropy(from_logits=True), (0, 1)),
        (1, None, "mse", (-5, 7)),
    ]:
        info = check_config(_model(units, act, loss), labels)
        assert info["config_check"]["ok"], (units, act, loss)
        assert config_problems(dict(info, loss=info["loss_name"])) == [], (units, act, loss)


def test_softmax_on_one_unit_is_critical():
    info = check_config(_model(1, "softmax", "binary_crossentropy"), (0, 1))
    (problem,) = info["config_check"]["problems"]
    assert problem["severity"] == "critical" and "single output unit" in problem["message"]


def test_sigmoid_with_categorical_crossentropy():
    info = check_config(_model(4, "sigmoid", "categorical_crossentropy"), (0, 1))
    assert "sigmoid outputs" in _messages(info)


def test_sparse_labels_out_of_range_and_one_hot_loss_on_integers():
    info = check_config(_model(3, "softmax", "sparse_categorical_crossentropy"), (0, 5))
    assert "valid labels are 0..2" in _messages(info)
    info = check_config(_model(3, "softmax", "categorical_crossentropy"), (0, 2))
    assert "expects one-hot labels" in _messages(info)


def test_probabilities_into_from_logits_loss_uses_detector_rule():
    loss = keras.losses.BinaryCrossentropy(from_logits=True)
    info = check_config(_model(1, "sigmoid", loss), (0, 1))
    assert info["from_logits"] is True and info["output_activation"] == "sigmoid"
    assert "applies sigmoid twice" in _messages(dict(info, loss=info["loss_name"]))
    assert classification_mode(_model(1, None, loss)) == ("binary", True)
    assert classification_mode(_model(1, None, "mse")) == (None, False)


def test_mismatch_reaches_the_report_from_a_real_run(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3)).astype("float32")
    y = rng.integers(0, 2, (64, 1)).astype("float32") * 3  # labels {0, 3}
    model = _model(1, "sigmoid", "binary_crossentropy")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0,
              callbacks=[StabilityCallback(str(tmp_path), every=1)])
    findings = [f for r in analyze_logdir(str(tmp_path)).runs for f in r.findings
                if f.kind == "config_mismatch"]
    assert findings and "outside [0, 1]" in findings[0].explanation
    assert findings[0].evidence["recorded"]["label_max"] == 3.0


def test_layer_activations_describe_recurrent_cells_and_custom_callables():
    def squashed(x):
        return keras.ops.tanh(0.01 * x)

    model = keras.Sequential([
        keras.Input((None, 4)),
        keras.layers.LSTM(6, activation="sigmoid", return_sequences=True, name="lstm"),
        keras.layers.GRU(5, name="gru"),
        keras.layers.Dense(3, activation=squashed, name="dense"),
        keras.layers.Dropout(0.1),
        keras.layers.Dense(2, activation="softmax", name="dense_1"),
    ], name="sequential")
    model.compile("adam", "categorical_crossentropy")
    table = check_config(model)["layer_activations"]
    assert set(table) == {"sequential/lstm", "sequential/lstm/lstm_cell", "sequential/gru",
                          "sequential/gru/gru_cell", "sequential/dense", "sequential/dense_1"}
    assert table["sequential/lstm/lstm_cell"] == {
        "class": "LSTMCell", "activation": "sigmoid", "kind": "saturating",
        "recurrent_activation": "sigmoid", "units": 6}
    assert table["sequential/gru/gru_cell"]["activation"] == "tanh"
    assert table["sequential/dense"] == {"class": "Dense", "activation": "squashed",
                                         "kind": "saturating", "units": 3}
    # Every variable's path starts with a described layer's path.
    for variable in model.trainable_variables:
        assert any(variable.path.startswith(path + "/") for path in table), variable.path
