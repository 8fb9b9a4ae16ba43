"""Trend, update-ratio, activation, data, overfitting and config detectors."""

from __future__ import annotations

import re

import statistics

import numpy as np
import pytest

from tb_stability.detectors import (
    PAIR_DETECTORS, activations, config, data, detect_pairs, generalization, trends, updates)
from tb_stability.rundata import Matrix, RunData
from tests import detectors_support as S


def ref_autocorr(xs, lag):
    m = sum(xs) / len(xs)
    d = [x - m for x in xs]
    return sum(d[i] * d[i + lag] for i in range(len(d) - lag)) / sum(v * v for v in d)


@pytest.mark.parametrize("seed", range(4))
def test_pure_functions_match_references(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=60)
    from tb_stability.detectors import _robust
    assert _robust.autocorr(x, 3) == pytest.approx(ref_autocorr(list(x), 3))
    first = [statistics.median(x[:6])]
    assert _robust.level(x, 0.1) == pytest.approx(first[0])
    # update ratio columns
    v = 10 ** rng.uniform(-7, 0.5, (30, 5))
    hi = [j for j in range(5) if statistics.median(v[:, j]) > 0.1 or max(v[:, j]) > 1.0]
    lo = [j for j in range(5) if statistics.median(v[3:, j]) < 1e-5]
    assert updates.high_columns(v) == hi and updates.low_columns(v) == lo
    # persistent layers
    f = rng.random((20, 3))
    got = [j for j, _, _ in activations.persistent_layers(f, 0.5)]
    assert got == [j for j in range(3) if statistics.median(f[10:, j]) >= 0.5]
    # imbalance
    c = rng.integers(1, 100, 4)
    assert data.imbalance(c) == pytest.approx((max(c) / sum(c), max(c) / min(c)))


def test_divergence_after_progress():
    loss = np.concatenate([np.linspace(2, 0.5, 300), np.linspace(0.5, 3, 200)])
    loss *= 1 + np.random.default_rng(0).normal(0, 0.03, loss.size)
    (f,) = trends.detect_divergence(S.make_run(loss))
    assert f.severity == "warning" and 300 <= f.first_step <= 360
    loss[-100:] *= 30
    (f,) = trends.detect_divergence(S.make_run(loss))
    assert f.severity == "critical" and "learning_rate=0.0001" in f.remedy


@pytest.mark.parametrize("detector", [trends.detect_divergence, trends.detect_stalled,
                                      trends.detect_oscillation, updates.detect],
                         ids=["divergence", "stalled", "oscillation", "update_ratio"])
def test_healthy_run_gives_no_trend_findings(detector):
    n = 1200
    ur = S.per_variable(n, scale=[2e-3, 1e-2, 1e-3, 1e-2, 3e-3, 1e-2])
    assert detector(S.make_run(S.healthy_loss(n), variables={"update_ratio": ur})) == []


def test_stalled_flat_loss_and_frozen_weights():
    rng = np.random.default_rng(0)
    loss = 0.69 + rng.normal(0, 0.01, 400)
    ur = S.per_variable(400, scale=[1e-7] * 6)
    (f,) = trends.detect_stalled(S.make_run(loss, lr=1e-7, variables={"update_ratio": ur}))
    assert f.kind == "stalled" and "learning_rate=0.001" in f.remedy and f.first_step == 0
    moving = S.per_variable(400, scale=[1e-3] * 6)
    assert trends.detect_stalled(S.make_run(loss, variables={"update_ratio": moving})) == []


def test_stalled_ignores_micro_steps_without_update_under_accumulation():
    rng = np.random.default_rng(0)
    loss = 0.69 + rng.normal(0, 0.01, 400)
    ur = S.per_variable(400, scale=[1e-3] * 6)
    ur.values[ur.steps % 30 != 20] = 0.0  # k=3 with every=10: two of three records are 0
    info = {"optimizer_config": {"learning_rate": 1e-3, "gradient_accumulation_steps": 3}}
    accumulated = S.make_run(loss, variables={"update_ratio": ur},
                             json={"stability/run_info": [(0, info)]})
    assert trends.detect_stalled(accumulated) == []  # the weights do move, every third step
    plain = S.make_run(loss, variables={"update_ratio": ur})
    assert [f.kind for f in trends.detect_stalled(plain)] == ["stalled"]


def test_oscillation_see_saw_without_progress():
    t = np.arange(400)
    loss = 1.0 + 0.6 * (-1) ** t
    (f,) = trends.detect_oscillation(S.make_run(loss))
    assert f.evidence["period"] == 2 and f.first_step == 200
    rng = np.random.default_rng(1)
    assert trends.detect_oscillation(S.make_run(1.0 + rng.normal(0, 0.3, 400).clip(-0.9))) == []


def test_update_ratio_high_and_low():
    ur = S.per_variable(300, scale=[0.3, 1.0, 1e-3, 1.0, 1e-3, 1.0])
    (f,) = updates.detect(S.make_run(S.healthy_loss(300), variables={"update_ratio": ur}))
    assert (f.kind, f.layers) == ("update_ratio_high", ["sequential/dense/kernel"])
    # The ratio asks for ~300x (1e-3 -> ~3e-6); a remedy cuts at most 100x at once.
    assert "learning_rate=1e-05" in f.remedy and "~100x" in f.remedy and "298x" in f.remedy
    ur = S.per_variable(300, scale=[0.12, 1.0, 1e-3, 1.0, 1e-3, 1.0])
    (f,) = updates.detect(S.make_run(S.healthy_loss(300), variables={"update_ratio": ur}))
    assert "~100x to bring the ratio near 0.001" in f.remedy and "re-measure" not in f.remedy
    ur = S.per_variable(300, scale=[1e-7, 1e-9, 1e-7, 1e-9, 1e-7, 1e-9], seed=3)
    (f,) = updates.detect(S.make_run(S.healthy_loss(300), lr=1e-7, variables={"update_ratio": ur}))
    assert f.kind == "update_ratio_low" and len(f.layers) == 3 and "learning_rate=0.001" in f.remedy


@pytest.mark.parametrize("lr, advice", [
    (1e-7, "Raise the learning rate ~10000x"),   # 1e-7 -> 1e-3: the measured factor
    (1e-3, "Raise the learning rate ~10x"),      # 1e-3 -> capped at 1e-2: the factor says so
    (1.0, "The learning rate is already 1,"),     # raising it is not the fix
    (None, "Raise the learning rate (it is unknown"),
], ids=["tiny-lr", "capped", "already-large", "unknown-lr"])
def test_small_updates_advice_agrees_with_its_snippet(lr, advice):
    rng = np.random.default_rng(0)
    loss = 0.69 + rng.normal(0, 0.01, 400)
    ur = S.per_variable(400, scale=[1e-7, 1e-9, 1e-7, 1e-9, 1e-7, 1e-9], seed=3)
    run = S.make_run(loss, lr=lr if lr is not None else np.nan, variables={"update_ratio": ur})
    found = {f.kind: f for f in trends.detect_stalled(run) + updates.detect(run)}
    assert set(found) == {"stalled", "update_ratio_low"}
    for finding in found.values():
        assert advice in finding.remedy, finding.remedy
        suggested = float(re.findall(r"learning_rate=([0-9.e+-]+)", finding.remedy)[-1])
        if lr is not None and lr >= 1e-2:
            assert suggested < lr and "dead or saturated units" in finding.remedy
        elif lr is not None:
            assert lr < suggested <= 1e-2


def layer_run(quantity, values, names=("dense", "dense_1")):
    steps = np.arange(0, 10 * len(values), 10)
    return RunData(name="r", layers={quantity: Matrix(steps, names, np.asarray(values, float))})


def test_dead_and_saturated_layers():
    dead = [[0.1, 0.2]] * 5 + [[0.8, 0.2]] * 10
    (f,) = activations.detect_dead(layer_run("dead_fraction", dead))
    assert (f.layers, f.first_step, f.severity) == (["dense"], 50, "warning")
    (f,) = activations.detect_dead(layer_run("dead_fraction", [[1.0, 0.1]] * 6))
    assert f.severity == "critical"
    assert activations.detect_dead(layer_run("dead_fraction", [[0.5, 0.6]] * 10)) == []
    (f,) = activations.detect_saturated(layer_run("saturated_fraction", [[0.2, 0.9]] * 8))
    assert f.layers == ["dense_1"] and "BatchNormalization" in f.remedy


@pytest.mark.parametrize("names, table, wanted, unwanted", [
    (("gru_1",), {"seq/gru_1": {"class": "GRU", "activation": "tanh", "units": 32},
                  "seq/gru_1/gru_cell": {"class": "GRUCell", "activation": "tanh"}},
     ["GRU cell", "LayerNormalization", "clipnorm="], ["relu", "ReLU"]),
    (("lstm",), {"seq/lstm": {"class": "LSTM", "activation": "sigmoid", "units": 16}},
     ["activation='sigmoid'", "keras.layers.LSTM(16)", "activation='tanh'"], ["ReLU"]),
    (("lstm_2",), {}, ["LSTM cell", "LayerNormalization"], ["ReLU"]),
    (("dense_1",), {"seq/dense_1": {"class": "Dense", "activation": "sigmoid"}},
     ["BatchNormalization", "switch to ReLU"], ["LayerNormalization", "LSTM"]),
    (("dense_1", "gru"), {}, ["In gru: the GRU cell", "In dense_1: scale the inputs"], []),
], ids=["gru-tanh", "lstm-sigmoid", "lstm-by-name", "dense-sigmoid", "dense-and-gru"])
def test_saturated_remedy_fits_the_layer_kind(names, table, wanted, unwanted):
    info = {"layer_activations": table} if table else {}
    run = layer_run("saturated_fraction", [[0.9] * len(names)] * 6, names=names)
    run.json["stability/run_info"] = [(0, info)]
    (f,) = activations.detect_saturated(run)
    for text in wanted:
        assert text in f.remedy
    for text in unwanted:
        assert text not in f.remedy


def input_run(mean, std, lo, hi):
    names = tuple(f"f{j}" for j in range(len(mean)))
    mk = lambda v: Matrix(np.array([0]), names, np.asarray([v], float))  # noqa: E731
    return RunData(name="r", inputs={"mean": mk(mean), "std": mk(std), "min": mk(lo), "max": mk(hi)})


@pytest.mark.parametrize("stats,flag", [
    (([500, 5e5], [290, 2.9e5], [0, 0], [1000, 1e6]), True),
    (([0, 0], [1, 1], [-4, -4], [4, 4]), False),
    (([0.5, 0.1], [0.3, 0.001], [0, 0], [1, 1]), False),
    (([0, 0], [200, 1], [-5, -5], [5, 5]), True),
], ids=["x1000", "standardised", "minmax-with-near-constant-pixel", "std-ratio"])
def test_unscaled_inputs(stats, flag):
    found = data.detect_unscaled(input_run(*stats))
    assert bool(found) == flag
    if flag:
        assert "Normalization" in found[0].remedy


def named_input_run(names, extent):
    mk = lambda v: Matrix(np.array([0]), tuple(names), np.asarray([v], float))  # noqa: E731
    n = len(names)
    return RunData(name="r", inputs={"mean": mk([0.0] * n), "std": mk([1.0] * n),
                                     "min": mk([-e for e in extent]), "max": mk(extent)})


@pytest.mark.parametrize("names, extent, adapted, spread_named", [
    (("x[0]", "x[1]"), [5e3, 4.0], ["x_train)"], False),
    (("age[0]", "pixels[*]"), [90.0, 0.5], ["x_train['age']"], False),
    (("x0[0]", "x1[0]", "x1[1]"), [3e3, 2e3, 1.0], ["x_train[0]", "x_train[1]"], False),
    (("f0", "f1"), [5.0, 5.0], ["x_train)"], True),
], ids=["one-input", "dict-input", "list-of-inputs", "unnamed-std-ratio"])
def test_unscaled_inputs_remedy_names_the_inputs_to_standardise(names, extent, adapted,
                                                                spread_named):
    run = named_input_run(names, extent)
    if spread_named:
        run.inputs["std"].values[0] = [200.0, 1.0]
    (f,) = data.detect_unscaled(run)
    assert re.findall(r"x_train(?:\[[^\]]+\]|\))", f.remedy) == adapted
    assert ("spreads differ" in f.explanation) == spread_named


def test_class_imbalance_labels_and_collapse():
    lab = Matrix(np.array([0, 10]), ("0", "1"), np.array([[970.0, 30.0], [960.0, 40.0]]))
    (f,) = data.detect_imbalance(RunData(name="r", labels=lab))
    assert f.evidence["majority_share"] > 0.9 and "class_weight" in f.remedy
    bal = Matrix(np.array([0, 10]), ("0", "1"), np.array([[500.0, 500.0], [490.0, 510.0]]))
    pred = Matrix(np.array([0, 10, 20, 30]), ("0", "1"), np.array([[500.0, 500], [990, 10], [999, 1], [1000, 0]]))
    assert data.detect_imbalance(RunData(name="r", labels=bal)) == []
    (f,) = data.detect_imbalance(RunData(name="r", labels=bal, predictions=pred))
    assert f.evidence["predicted_class"] == "0"


@pytest.mark.parametrize("final_loss, labels_known, learned_nothing", [
    (0.69, True, True), (0.30, True, False), (0.69, False, False), (36.0, True, False)],
    ids=["loss-at-label-entropy", "loss-below-it", "labels-unknown", "loss-far-above-it"])
def test_a_collapse_on_balanced_labels_is_not_called_an_imbalance(final_loss, labels_known,
                                                                   learned_nothing):
    bal = Matrix(np.array([0, 10]), ("0", "1"), np.array([[500.0, 500.0], [490.0, 510.0]]))
    pred = Matrix(np.array([0, 10, 20, 30]), ("0", "1"),
                  np.array([[500.0, 500], [990, 10], [999, 1], [1000, 0]]))
    info = {"loss_name": "binary_crossentropy"}
    run = S.make_run(np.full(200, final_loss), labels=bal if labels_known else None,
                     predictions=pred, json={"stability/run_info": [(0, info)]})
    (f,) = data.detect_imbalance(run)
    assert f.severity == "warning"
    if labels_known:
        assert f.remedy.startswith("Class weights will not help with balanced labels")
        assert "class_weight=" not in f.remedy
        assert f.evidence["label_entropy"] == pytest.approx(0.6929, abs=1e-3)  # 0.495/0.505
        assert f.evidence["final_loss"] == pytest.approx(final_loss)
    else:
        assert "class_weight=" in f.remedy and "label_entropy" not in f.evidence
    assert ("has learned nothing" in f.explanation) == learned_nothing
    assert ("worse than knowing nothing" in f.explanation) == (final_loss > 1.5 * 0.6929)


def test_a_collapse_on_70_30_labels_keeps_the_class_weight_remedy():
    skewed = Matrix(np.array([0, 10]), ("0", "1"), np.array([[700.0, 300.0], [700.0, 300.0]]))
    pred_all_0 = Matrix(np.array([0, 10, 20, 30]), ("0", "1"), np.array([[999.0, 1]] * 4))
    (f,) = data.detect_imbalance(RunData(name="r", labels=skewed, predictions=pred_all_0))
    assert "class_weight=" in f.remedy  # 70/30 labels: weighting can still help


@pytest.mark.parametrize(
    "predicted_majority,severity",
    [(1000.0, "warning"), (990.0, "warning"), (700.0, "info")],
    ids=["collapsed", "barely-minority", "weighted"],
)
def test_imbalanced_labels_are_info_when_predictions_keep_the_minority(predicted_majority, severity):
    lab = Matrix(np.array([0, 10]), ("0", "1"), np.array([[970.0, 30.0], [970.0, 30.0]]))
    pred = Matrix(np.array([0, 10]), ("0", "1"),
                  np.array([[500.0, 500.0], [predicted_majority, 1000.0 - predicted_majority]]))
    (f,) = data.detect_imbalance(RunData(name="r", labels=lab, predictions=pred))
    assert f.severity == severity
    assert f.evidence["prediction_majority_share"] == pytest.approx(predicted_majority / 1000.0)
    if severity == "info":  # it says what it measured, not a guess at class weights
        assert "70% class 0 against 97% of the labels, so it still predicts the minority" \
            in f.explanation, f.explanation


def epochs(train, val):
    return S.scalar_run({"epoch_loss": train, "epoch_val_loss": val})


def test_overfitting_within_run_and_across_keras_runs():
    train = list(np.linspace(1.0, 0.1, 30))
    val = list(np.concatenate([np.linspace(1.0, 0.5, 10), np.linspace(0.5, 0.9, 20)]))
    (f,) = generalization.detect(epochs(train, val))
    assert f.kind == "overfitting" and 9 <= f.evidence["best_step"] <= 11 and f.first_step == f.evidence["best_step"] + 1
    runs = {"m/train": S.scalar_run({"epoch_loss": train}, "m/train"),
            "m/validation": S.scalar_run({"epoch_loss": val}, "m/validation")}
    (f,) = detect_pairs(runs)
    assert f.run == "m/validation" and generalization.detect_pairs in PAIR_DETECTORS
    assert generalization.detect(epochs(train, list(np.linspace(1.0, 0.3, 30)))) == []


def test_config_mismatch_recorded_and_rules():
    rec = {"config_check": ["sigmoid output with categorical_crossentropy"]}
    (f,) = config.detect(RunData(name="r", json={"stability/run_info": [(0, rec)]}))
    assert "sigmoid" in f.explanation
    rec = {"loss": "binary_crossentropy", "output_activation": "sigmoid", "from_logits": True}
    (f,) = config.detect(RunData(name="r", json={"stability/run_info": [(0, rec)]}))
    assert "twice" in f.explanation
    ok = {"loss": "binary_crossentropy", "output_activation": "sigmoid", "from_logits": False,
          "label_min": 0, "label_max": 1}
    assert config.detect(RunData(name="r", json={"stability/run_info": [(0, ok)]})) == []


@pytest.mark.parametrize("origin, x_kind, y_kind, bad", [
    ("inputs", "list", "single", [("x", "1", [3])]),
    ("inputs", "dict", "single", [("x", "a", [0]), ("x", "b", [5, 6])]),
    ("labels", "single", "dict", [("y", "reg", [2])]),
], ids=["list-input", "two-dict-inputs", "multi-output-label"])
def test_data_remedy_snippet_drops_exactly_the_rows_named(origin, x_kind, y_kind, bad):
    """The snippet, run on data of the structure named, keeps every other row in every part."""
    keras = pytest.importorskip("keras")
    from tb_stability.detectors._data_remedies import data_remedy
    rng = np.random.default_rng(0)

    def make(kind, keys):
        if kind == "single":
            return rng.normal(size=(8, 3))
        parts = [rng.normal(size=(8, 2, 2)) for _ in keys]
        return list(parts) if kind == "list" else dict(zip(keys, parts))

    data = {"x": make(x_kind, ["a", "b"]), "y": make(y_kind, ["cls", "reg"])}
    data["y"] = data["y"] if y_kind != "single" else np.arange(8.0)
    rows = []
    for var, name, where in bad:
        part = data[var][int(name)] if isinstance(data[var], list) else data[var][name]
        part[where] = np.nan
        rows += where
    record = {"origin": origin, "nonfinite_rows": [
        {"name": name, "rows": where, "count": len(where), "of": 8} for _, name, where in bad]}
    remedy = data_remedy(record)
    for _, name, _ in bad:
        assert (f"[{name}]" if name.isdigit() else f"['{name}']") in remedy
    code = "\n".join(line[4:] for line in remedy.splitlines()[1:]
                     if line.startswith("    ") and not line.startswith("    #"))
    scope = {"np": np, "keras": keras, **data}
    exec(code, scope)
    kept = keras.tree.flatten((scope["x"], scope["y"]))
    assert {len(v) for v in kept} == {8 - len(set(rows))}
    assert all(np.isfinite(v).all() for v in kept)
