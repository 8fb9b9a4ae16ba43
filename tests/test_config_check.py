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
from tb_stability.reader import load_run  # noqa: E402


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


def _two_outputs(as_dict: bool, cls_activation=None):
    x = keras.Input((3,), name="x")
    h = keras.layers.Dense(8, activation="relu")(x)
    reg = keras.layers.Dense(1, name="reg")(h)
    cls = keras.layers.Dense(3, activation=cls_activation, name="cls")(h)
    # As a dict, the keys sort the other way round from the layers' order.
    outputs = {"z_reg": reg, "a_cls": cls} if as_dict else [reg, cls]
    return keras.Model(x, outputs)


def _fit_report(tmp_path, model, y):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3)).astype("float32")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0,
              callbacks=[StabilityCallback(str(tmp_path), every=1)])
    (run,) = analyze_logdir(str(tmp_path)).runs
    return run, [f for f in run.findings if f.kind == "config_mismatch"]


def test_each_output_is_checked_against_its_own_loss(tmp_path):
    """A regression head with MSE beside a logits head with from_logits=True is healthy.

    Pairing the list of losses with the first output made this a false
    "crossentropy on a linear output" warning.
    """
    rng = np.random.default_rng(1)
    model = _two_outputs(as_dict=False)
    model.compile("adam", ["mse", keras.losses.SparseCategoricalCrossentropy(from_logits=True)])
    info = check_config(model, (-1.5, 2.0))
    assert [(e["output"], e["output_activation"], e["output_units"], e["loss_name"],
             e["from_logits"]) for e in info["outputs"]] == [
        ("reg", "linear", 1, "mse", False),
        ("cls", "linear", 3, "sparse_categorical_crossentropy", True)]
    assert info["outputs"][0]["label_min"] == -1.5 and info["outputs"][1]["label_min"] is None
    assert info["loss_name"] is None and info["output_activation"] is None
    assert info["config_check"]["ok"] and config_problems(info) == []
    assert classification_mode(model) == (None, False)  # the first output is the regression

    y = [rng.standard_normal((64, 1)).astype("float32"), rng.integers(0, 3, 64)]
    run, findings = _fit_report(tmp_path, model, y)
    assert findings == []
    records = load_run(str(tmp_path)).json["stability/run_info"]
    recorded = [i for _, i in records if "outputs" in i][-1]
    assert [e["loss_name"] for e in recorded["outputs"]] == ["mse",
                                                             "sparse_categorical_crossentropy"]


def test_a_misconfigured_output_is_named_and_gets_its_own_loss_class(tmp_path):
    """A dict of outputs with a dict of losses: the softmax head with from_logits=True is flagged."""
    rng = np.random.default_rng(2)
    model = _two_outputs(as_dict=True, cls_activation="softmax")
    model.compile("adam", {
        "z_reg": "mse",
        "a_cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True)})
    entries = check_config(model)["outputs"]
    assert [(e["output_layer"], e["loss_name"]) for e in entries] == [
        ("cls", "sparse_categorical_crossentropy"), ("reg", "mse")]
    y = {"z_reg": rng.standard_normal((64, 1)).astype("float32"),
         "a_cls": rng.integers(0, 3, 64)}
    _, findings = _fit_report(tmp_path, model, y)
    (finding,) = findings
    assert finding.explanation.startswith("output 'cls': from_logits=True with a softmax output")
    assert "keras.losses.SparseCategoricalCrossentropy(from_logits=True)" in finding.remedy
    assert "BinaryCrossentropy" not in finding.remedy and "reg" not in finding.explanation


def test_logits_remedy_names_the_loss_of_the_same_kind():
    for loss, expected in [("categorical_crossentropy", "CategoricalCrossentropy"),
                           ("sparse_categorical_crossentropy", "SparseCategoricalCrossentropy"),
                           ("binary_crossentropy", "BinaryCrossentropy")]:
        units = 1 if loss.startswith("binary") else 3
        info = check_config(_model(units, None, loss), None)
        (problem,) = config_problems(info)
        assert "on a linear output expects probabilities" in problem["message"], loss
        assert f"keras.losses.{expected}(from_logits=True)" in problem["remedy"], loss


def test_records_of_several_losses_without_outputs_pair_nothing():
    """run_info from before per-output entries: a list of losses is not one loss name."""
    info = {"loss": ["mse", {"class_name": "SparseCategoricalCrossentropy",
                             "config": {"from_logits": True}}],
            "output_activation": "linear", "from_logits": False, "output_units": 1}
    assert config_problems(info) == []
    one = dict(info, loss={"class_name": "BinaryCrossentropy", "config": {}})
    assert "binary_crossentropy on a linear output" in _messages(one)


@pytest.mark.parametrize("units, activation, loss, labels, expected", [
    (1, None, "mse", (-99, 99), None),
    (1, None, "mse", (-3.6e4, 2.2e5), "far from unit scale"),
    (1, "relu", keras.losses.MeanAbsoluteError(), (0, 255), "far from unit scale"),
    (1, None, keras.losses.Huber(), (-500, 0), "far from unit scale"),
    (1, "sigmoid", "mse", (0, 1), None),
    (1, "sigmoid", "mse", (0, 10), "cannot fit them"),
    (1, "tanh", "mae", (-1, 3), "cannot fit them"),
    (1, None, "mean_squared_logarithmic_error", (0, 2e5), None),  # scale-free already
    (2, "softmax", "sparse_categorical_crossentropy", (0, 1), None),
    (1, "relu", "mse", (-8.4, 5), "cannot go below 0"),
    (1, "relu", "mse", (0, 5), None),  # counts: a ReLU output can reach 0
    (1, "softplus", keras.losses.Huber(), (-1, 5), "cannot go below 0"),
    (1, "elu", "mse", (-0.5, 5), None),
    (1, "elu", "mse", (-3, 5), "cannot go below -1"),
], ids=["unit-ish", "prices-mse", "pixels-mae-relu", "huber-negative", "sigmoid-in-range",
        "sigmoid-out-of-range", "tanh-out-of-range", "msle", "classification",
        "relu-negative-labels", "relu-counts", "softplus-negative-labels", "elu-above-floor",
        "elu-below-floor"])
def test_regression_labels_the_output_cannot_reach_or_reaches_slowly(
        units, activation, loss, labels, expected):
    info = check_config(_model(units, activation, loss), labels)
    messages = _messages(dict(info, loss=info["loss_name"]))
    if expected is None:
        assert messages == "", messages
    else:
        assert expected in messages and f"{labels[1]:.4g}" in messages, messages


def test_unscaled_regression_targets_from_a_real_run_and_the_remedy_that_fixes_them(tmp_path):
    # House prices in dollars: the loss starts at ~1e10 and Adam at 1e-3 barely moves it.
    rng = np.random.default_rng(0)
    x_train = rng.standard_normal((1024, 3)).astype("float32")
    y_train = (5e4 + 2e4 * (x_train @ np.array([[1.0], [-2.0], [0.5]]))).astype("float32")
    keras.utils.set_random_seed(0)
    model = _model(1, None, "mse")
    model.fit(x_train, y_train, batch_size=32, epochs=2, verbose=0,
              callbacks=[StabilityCallback(str(tmp_path / "prices"), every=10)])
    (run,) = analyze_logdir(str(tmp_path)).runs
    (finding,) = [f for f in run.findings if f.kind == "config_mismatch"]
    assert finding.severity == "warning" and "far from unit scale" in finding.explanation
    assert "Over this run the loss went from" in finding.explanation
    start, end = (float(v) for v in
                  finding.explanation.split("went from ")[1].split(" (")[0].split(" to "))
    assert start > 1e9 and end > 0.5 * start  # stuck, as the finding says

    # The remedy's snippet, run as written, trains the same model to a small error.
    keras.utils.set_random_seed(0)
    fixed = keras.Sequential([keras.Input((3,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(1)])
    fixed.compile("adam", "mse")
    namespace = {"x_train": x_train, "y_train": y_train, "model": fixed, "x": x_train}
    snippet = finding.remedy.replace("...", "batch_size=32, epochs=20, verbose=0")
    exec("\n".join(line.strip() for line in snippet.splitlines()), namespace)
    rmse = float(np.sqrt(np.mean((namespace["y_pred"] - y_train) ** 2)))
    assert rmse < 0.2 * float(y_train.std()), rmse  # 1.0 when stuck at the mean


def _batch_norm_model(inputs=(10,), conv=False, frozen=False):
    layers = keras.layers
    body = [layers.Conv2D(8, 3), layers.BatchNormalization(), layers.Activation("relu"),
            layers.Flatten()] if conv else [layers.Dense(32), layers.BatchNormalization(),
                                            layers.Activation("relu")]
    model = keras.Sequential([keras.Input(inputs)] + body + [layers.Dense(1)])
    model.layers[1].trainable = not frozen
    model.compile("adam", "mse")
    return model


@pytest.mark.parametrize("rows, conv, frozen, expected", [
    (1, False, False, "critical"),
    (2, False, False, "warning"),
    (3, False, False, None),
    (1, True, False, None),  # a convolution's feature is normalised over its 6 x 6 positions
    (1, False, True, None),  # trainable=False: inference mode, the moving statistics
    (None, False, False, None),  # batch size unknown (an ordinary log)
], ids=["dense-batch-1", "dense-batch-2", "dense-batch-3", "conv-batch-1", "frozen-batch-1",
        "unknown-batch"])
def test_batch_norm_over_one_or_two_values_per_feature(rows, conv, frozen, expected):
    model = _batch_norm_model((8, 8, 3) if conv else (10,), conv, frozen)
    info = check_config(model, None, rows)
    problems = [p for p in info["config_check"]["problems"] if "batch_norm_values" in p]
    assert info["batch_size"] == rows
    assert [p["severity"] for p in problems] == ([expected] if expected else [])
    if expected:
        assert problems[0]["layer"] == model.layers[1].path
        assert problems[0]["batch_norm_values"] == rows


def test_batch_size_one_under_batch_norm_is_the_cause_the_report_names(tmp_path):
    # A ReLU after BatchNorm at batch size 1 is 100% dead and nothing before it
    # gets a gradient; the report blames the batch size, not the initialisation.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((160, 10)).astype("float32")
    y = (x @ rng.standard_normal((10, 1))).astype("float32")
    for name, batch_size in (("one", 1), ("fixed", 32)):
        keras.utils.set_random_seed(0)
        _batch_norm_model().fit(x, y, batch_size=batch_size, epochs=1 if batch_size == 1 else 8,
                                verbose=0, callbacks=[StabilityCallback(str(tmp_path / name),
                                                                        every=10)])
    runs = {r.run: r for r in analyze_logdir(str(tmp_path)).runs}
    info = load_run(str(tmp_path / "one")).json["stability/run_info"][-1][1]
    assert info["batch_size"] == 1
    loud = [f for f in runs["one"].findings if f.severity != "info"]
    assert [(f.kind, f.severity) for f in loud] == [("config_mismatch", "critical")]
    assert "batch size 1" in loud[0].explanation and "batch_size=32" in loud[0].remedy
    quiet = [f for f in runs["one"].findings if f.severity == "info"]
    assert "dead_units" in {f.kind for f in quiet}
    for finding in quiet:
        assert finding.evidence["consequence_of"] == "config_mismatch", finding.kind
        assert finding.remedy.startswith("Fix the batch size first")

    fixed_info = load_run(str(tmp_path / "fixed")).json["stability/run_info"][-1][1]
    assert fixed_info["batch_size"] == 32
    assert not [f for f in runs["fixed"].findings if f.kind in ("config_mismatch", "dead_units")]
