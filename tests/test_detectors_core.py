"""Detectors needed end to end: nan_inf, exploding/vanishing gradients, loss/final-step spikes.

Each pure function is checked against a slow, obvious plain-Python reference on
random inputs, then the adapters on readable synthetic runs.
"""

from __future__ import annotations

import math
import re
import statistics

import numpy as np
import pytest

from tb_stability.detectors import ALL_DETECTORS, _layer_kinds, _robust, gradients, nonfinite, spikes
from tb_stability.rundata import Matrix, RunData, Series
from tests import detectors_support as S


# ---------------------------------------------------------------- references
def ref_percentile(xs, q):
    xs = sorted(xs)
    pos = q / 100 * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ref_trailing(values, window, min_history):
    meds, spreads = [], []
    for i in range(len(values)):
        w = [v for v in values[max(0, i - window):i] if math.isfinite(v)]
        if len(w) < min_history or not w:
            meds.append(math.nan)
            spreads.append(math.nan)
            continue
        m = statistics.median(w)
        d = statistics.median([abs(v - m) for v in w])
        s = max(1.4826 * d, (ref_percentile(w, 99) - m) / 2.326, 1e-3 * abs(m), 1e-12)
        meds.append(m)
        spreads.append(s)
    return meds, spreads


def ref_flags(values, window, z, rel, min_history):
    f = [v for v in values if math.isfinite(v)]
    meds, spreads = ref_trailing(f, window, min_history)
    out = []
    for v, m, s in zip(f, meds, spreads):
        out.append(math.isfinite(m) and (v - m) / s > z and (v - m) >= rel * abs(m))
    return out


def random_series(rng, n, nan_rate=0.05):
    x = rng.lognormal(0.0, 0.5, n)
    x[rng.random(n) < 0.02] *= 20
    x[rng.random(n) < nan_rate] = np.nan
    return x


@pytest.mark.parametrize("seed", range(5))
def test_trailing_stats_matches_reference(seed):
    rng = np.random.default_rng(seed)
    x = random_series(rng, 150)
    window, min_history = int(rng.integers(3, 40)), int(rng.integers(1, 10))
    med, spread = _robust.trailing_stats(x, window, min_history)
    rmed, rspread = ref_trailing(list(x), window, min_history)
    np.testing.assert_allclose(med, rmed, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(spread, rspread, rtol=1e-12, equal_nan=True)


@pytest.mark.parametrize("seed", range(5))
def test_rolling_median_and_runs_match_reference(seed):
    rng = np.random.default_rng(seed)
    x = random_series(rng, 80)
    k = int(rng.integers(1, 9))
    ref = []
    for i in range(len(x)):
        w = [v for v in x[max(0, i - k + 1):i + 1] if math.isfinite(v)]
        ref.append(statistics.median(w) if w else math.nan)
    np.testing.assert_allclose(_robust.rolling_median(x, k), ref, equal_nan=True)
    mask = rng.random(50) < 0.4
    runs, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        if not m and start is not None:
            runs.append((start, i - 1))
            start = None
    assert _robust.true_runs(mask) == runs


@pytest.mark.parametrize("seed", range(5))
def test_flag_spikes_matches_reference(seed):
    rng = np.random.default_rng(seed)
    x = random_series(rng, 300)
    flags, *_, index = spikes.flag_spikes(x, window=50, z=4.0, rel_jump=0.5, min_history=10)
    assert list(flags) == ref_flags(list(x), 50, 4.0, 0.5, 10)
    assert list(index) == [i for i, v in enumerate(x) if math.isfinite(v)]


@pytest.mark.parametrize("seed", range(5))
def test_explosion_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(60, 200))
    x = np.exp(rng.normal(0, 0.3, n))
    k = int(rng.integers(20, n - 10))
    x[k:] *= np.exp(np.arange(n - k) * rng.uniform(0.0, 0.3))
    x[rng.random(n) < 0.03] = np.nan
    got = gradients.explosion(x)
    # Reference: plain loops.
    idx = [i for i, v in enumerate(x) if math.isfinite(v)]
    f = [x[i] for i in idx]
    nb = min(100, max(5, len(f) // 10))
    base = statistics.median(f[:nb])
    sm = [statistics.median(f[i - 4:i + 1]) if i >= 4 else math.nan for i in range(len(f))]
    cross = next((i for i, v in enumerate(sm) if v >= 50 * base), None)
    if cross is None:
        assert got is None
        return
    onset = cross
    while onset > 0 and sm[onset - 1] > 2 * base:
        onset -= 1
    onset = max(0, onset - 2)
    assert got["cross"] == idx[cross] and got["onset"] == idx[onset]
    assert got["baseline"] == pytest.approx(base)


@pytest.mark.parametrize("seed", range(5))
def test_vanishing_mask_and_nonfinite_columns_match_reference(seed):
    rng = np.random.default_rng(seed)
    first = 10 ** rng.uniform(-9, 0, 40)
    last = 10 ** rng.uniform(-3, 1, 40)
    mask, _ = gradients.vanishing_mask(first, last)
    assert list(mask) == [a / b < 1e-3 and a < 1e-4 for a, b in zip(first, last)]
    values = rng.normal(size=(12, 4))
    values[rng.random((12, 4)) < 0.1] = np.inf
    steps = np.arange(0, 120, 10)
    names = ("a", "b", "c", "d")
    target = int(rng.integers(0, 120))
    rows = [r for r in range(12) if any(not math.isfinite(v) for v in values[r])]
    after = [r for r in rows if steps[r] >= target]
    row = after[0] if after else (rows[-1] if rows else None)
    want = (None, []) if row is None else (
        int(steps[row]), [names[j] for j in range(4) if not math.isfinite(values[row, j])])
    assert nonfinite.nonfinite_columns(Matrix(steps, names, values), target) == want


# ---------------------------------------------------------------- adapters
def run_all(run):
    return [f for d in ALL_DETECTORS for f in d(run)]


def test_healthy_synthetic_run_gives_no_findings():
    n = 1200
    run = S.make_run(S.healthy_loss(n), S.healthy_grad(n), variables={"grad_norm": S.per_variable(n)})
    assert run_all(run) == []


@pytest.mark.parametrize("seed", range(3))
def test_healthy_noise_seeds_give_no_warnings(seed):
    n = 1500
    run = S.make_run(S.healthy_loss(n, seed=seed, steps_per_epoch=37),
                     S.healthy_grad(n, seed=seed + 10))
    assert S.kinds(run_all(run), "critical") == [] and S.kinds(run_all(run), "warning") == []


def test_real_keras_mlp_traces_give_no_warnings():
    """Per-step traces of a real Keras 3 MLP (Adam 1e-3, last batch 40 of 48 / 1 of 111)."""
    d = np.load(S.HEALTHY_NPZ)
    names = tuple(str(n) for n in d["names"])
    steps = np.arange(0, len(d["a_loss"]), 10)
    run = S.make_run(d["a_loss"], d["a_grad"], variables={
        "grad_norm": Matrix(steps, names, d["a_vg"].astype(float)),
        "update_ratio": Matrix(steps, names, d["a_ur"].astype(float))})
    assert [f for f in run_all(run) if f.severity != "info"] == []
    tiny_last_batch = S.make_run(d["b_loss"], d["b_grad"])
    found = run_all(tiny_last_batch)
    assert all(f.severity == "info" for f in found)
    assert all(f.evidence.get("recurring_period") == 10 for f in found)


@pytest.mark.parametrize("seed", [2, 8])
def test_one_spike_in_a_heavy_tailed_loss_does_not_recur(seed):
    """Among ~30 candidate periods, one phase of a heavy-tailed loss (Adam at 1.0: per-batch
    losses from 0.005 to 5) is 3x noisier than the rest by chance; with a single spike that was
    called "the spikes recur every 10 steps: the data is not shuffled" (2 of the first 60 seeds)."""
    loss = 0.5 * np.exp(1.2 * np.random.default_rng(seed).standard_normal(96))
    loss[77] = 30.0
    run = S.make_run(loss)
    found = [f for f in spikes.detect(run) if f.kind == "loss_spike"]
    assert [f.evidence["count"] for f in found] == [1]
    assert found[0].evidence["recurring_period"] is None and "recur" not in found[0].explanation


def test_nan_at_step_k_names_variables_and_origin():
    n, k = 400, 250
    loss = S.healthy_loss(n)
    grad = S.healthy_grad(n)
    loss[k:] = np.nan
    grad[k:] = np.nan
    nonf = np.zeros(n)
    nonf[k:] = 3
    var = S.per_variable(n)
    var.values[var.steps >= k, 0] = np.nan
    var.values[var.steps >= k, 2] = np.inf
    run = S.make_run(loss, grad, nonf, variables={"grad_norm": var},
                     json={"stability/nan_origin": [(k, {"tensor": "loss", "op": "Log"})]})
    found = [f for f in run_all(run) if f.kind == "nan_inf"]
    assert len(found) == 1
    f = found[0]
    assert (f.severity, f.first_step, f.last_step) == ("critical", k, n - 1)
    assert f.layers == ["sequential/dense/kernel", "sequential/dense_1/kernel"]
    assert f.evidence["origin"] == {"tensor": "loss", "op": "Log"}
    assert "clip_by_value" in f.remedy  # healthy gradients before: blame the loss
    assert "Log" in f.explanation
    f.to_json()


def test_nan_after_gradient_growth_blames_the_update():
    n, k = 300, 200
    grad = S.healthy_grad(n)
    grad[k - 15:k] *= np.geomspace(2, 5000, 15)
    loss = S.healthy_loss(n)
    loss[k:] = np.inf
    run = S.make_run(loss, grad)
    (f,) = [f for f in run_all(run) if f.kind == "nan_inf"]
    assert f.first_step == k and "clipnorm" in f.remedy


def test_nan_in_ordinary_epoch_loss():
    run = S.scalar_run({"epoch_loss": [1.0, 0.8, 0.7, float("nan"), float("nan")]})
    (f,) = nonfinite.detect(run)
    assert (f.first_step, f.last_step) == (3, 4)
    assert f.evidence["signals_at_onset"] == ["scalar:epoch_loss"]


def test_nonfinite_grads_count_alone_is_nan_inf():
    n = 200
    nonf = np.zeros(n)
    nonf[120] = 1
    run = S.make_run(S.healthy_loss(n), S.healthy_grad(n), nonf)
    (f,) = nonfinite.detect(run)
    assert f.first_step == 120 and f.last_step == 120


def test_exploding_gradients_1000x():
    n, k = 600, 300
    grad = S.healthy_grad(n)
    grad[k:] *= np.geomspace(1, 1000, n - k)
    var = S.per_variable(n)
    var.values[var.steps >= k, 0] *= np.geomspace(1, 3000, (var.steps >= k).sum())
    run = S.make_run(S.healthy_loss(n), grad, variables={"grad_norm": var})
    (f,) = gradients.detect_exploding(run)
    assert f.severity == "critical"
    assert k <= f.first_step < f.evidence["crossed_at_step"]
    assert f.layers[0] == "sequential/dense/kernel"
    base = f.evidence["baseline_grad_norm"]
    assert f"clipnorm={f.evidence['suggested_clipnorm']:g}" in f.remedy
    assert base > 0
    # Twice the median norm of the healthy stretch, before the explosion's onset.
    assert f.evidence["suggested_clipnorm"] == pytest.approx(2 * np.median(grad[:f.first_step]),
                                                             rel=0.05)
    assert "learning_rate=0.0001" in f.remedy


def test_exploding_with_clipping_already_set_suggests_the_learning_rate():
    n, k = 600, 300
    grad = S.healthy_grad(n)
    grad[k:] *= np.geomspace(1, 1000, n - k)
    info = {"optimizer_config": {"learning_rate": 0.01, "clipnorm": 1.0}}
    run = S.make_run(S.healthy_loss(n), grad, json={"stability/run_info": [(0, info)]})
    (f,) = gradients.detect_exploding(run)
    assert f.evidence["configured_clipping"] == {"clipnorm": 1.0}
    assert "already clipped (clipnorm=1)" in f.remedy
    assert f"clipnorm={f.evidence['suggested_clipnorm']:g}" not in f.remedy


def test_single_gradient_spike_is_not_exploding():
    grad = S.healthy_grad(500)
    grad[250] *= 1e4
    assert gradients.detect_exploding(S.make_run(S.healthy_loss(500), grad)) == []


def test_vanishing_names_early_layers():
    n = 500
    var = S.per_variable(n, scale=[1e-6, 1e-7, 1e-2, 1e-4, 1.0, 0.1])
    (f,) = gradients.detect_vanishing(S.make_run(S.healthy_loss(n), variables={"grad_norm": var}))
    assert f.severity == "warning"
    assert f.layers == ["sequential/dense"]
    assert "sequential/dense" in f.remedy and "he_normal" in f.remedy
    assert f.evidence["median_ratio_first_to_last"] < 1e-5


LSTM_NAMES = ("sequential/lstm/lstm_cell/kernel", "sequential/lstm/lstm_cell/recurrent_kernel",
              "sequential/lstm/lstm_cell/bias", "sequential/lstm_1/lstm_cell/kernel",
              "sequential/dense/kernel", "sequential/dense/bias")
LSTM_ACTIVATIONS = {
    "sequential/lstm": {"class": "LSTM", "activation": "sigmoid", "kind": "saturating",
                        "recurrent_activation": "sigmoid", "units": 48},
    "sequential/lstm/lstm_cell": {"class": "LSTMCell", "activation": "sigmoid",
                                  "kind": "saturating", "recurrent_activation": "sigmoid",
                                  "units": 48},
    "sequential/lstm_1/lstm_cell": {"class": "LSTMCell", "activation": "tanh",
                                    "kind": "saturating", "units": 48},
    "sequential/dense": {"class": "Dense", "activation": "softmax", "kind": "saturating"},
}


def _vanishing_run(names, table=None):
    n = 500
    var = S.per_variable(n, scale=[1e-6, 1e-7, 1e-7, 1e-2, 1.0, 0.1])
    var = Matrix(steps=var.steps, names=names, values=var.values)
    json = {"stability/run_info": [(0, {"every": 10, "layer_activations": table})]} \
        if table is not None else {}
    (f,) = gradients.detect_vanishing(S.make_run(S.healthy_loss(n), variables={"grad_norm": var},
                                                 json=json))
    return f


def test_vanishing_through_a_sigmoid_lstm_names_the_activation_and_an_lstm_fix():
    f = _vanishing_run(LSTM_NAMES, LSTM_ACTIVATIONS)
    assert f.layers == ["sequential/lstm/lstm_cell"]
    assert f.evidence["layer_activations"] == {"sequential/lstm/lstm_cell": "sigmoid"}
    assert "the recurrence uses activation='sigmoid'" in f.remedy
    assert "keras.layers.LSTM(48, return_sequences=True)" in f.remedy
    assert "clipnorm" in f.remedy and "Dense(64" not in f.remedy


@pytest.mark.parametrize("table", [None, {}], ids=["no-run-info", "empty-table"])
def test_vanishing_through_an_lstm_without_a_recorded_activation_still_gets_an_lstm_fix(table):
    f = _vanishing_run(LSTM_NAMES, table)
    assert "layer_activations" not in f.evidence
    assert "recurrence uses" not in f.remedy and "stack fewer recurrent layers" in f.remedy
    assert "keras.layers.LSTM(32, return_sequences=True)" in f.remedy


def test_vanishing_through_tanh_dense_layers_names_the_activation():
    table = {"sequential/dense": {"class": "Dense", "activation": "tanh", "kind": "saturating"},
             "sequential/dense_1": {"class": "Dense", "activation": "tanh", "kind": "saturating"},
             "sequential/dense_2": {"class": "Dense", "activation": "linear", "kind": "linear"}}
    f = _vanishing_run(S.NAMES, table)
    assert f.layers == ["sequential/dense"]
    assert "In sequential/dense (now activation='tanh'): use ReLU-family" in f.remedy
    assert "he_normal" in f.remedy and "LSTM" not in f.remedy


@pytest.mark.parametrize("layer, expected", [
    ("sequential/gru/gru_cell", "GRU"), ("model/simple_rnn_3/simple_rnn_cell", "SimpleRNN"),
    ("sequential/lstm_2/lstm_cell", "LSTM"), ("sequential/dense_lstm_like", None),
    ("sequential/dense", None)], ids=["gru", "simple-rnn", "lstm", "not-a-prefix", "dense"])
def test_recurrent_layers_are_told_apart_by_name_when_nothing_is_recorded(layer, expected):
    assert _layer_kinds.recurrent_class(layer, None) == expected


def test_a_recorded_class_wins_over_the_name_and_the_longest_prefix_is_used():
    table = {"m/lstm": {"class": "Dense"}, "m/lstm/inner": {"class": "GRUCell"}}
    assert _layer_kinds.recurrent_class("m/lstm", _layer_kinds.describe(table, "m/lstm")) is None
    assert _layer_kinds.describe(table, "m/lstm/inner/x") == {"class": "GRUCell"}
    assert _layer_kinds.describe(table, "m/lstm_1") is None


@pytest.mark.parametrize("scale", [[0.3, 0.05, 0.4, 0.05, 0.6, 0.1], [1e-3, 1e-8, 0.1, 1e-8, 0.5, 0.1]],
                         ids=["healthy", "ratio-ok-but-biases-tiny"])
def test_vanishing_negative(scale):
    var = S.per_variable(300, scale=scale)
    assert gradients.detect_vanishing(S.make_run(S.healthy_loss(300), variables={"grad_norm": var})) == []


@pytest.mark.parametrize("k", [300, 700, 1100])
def test_single_mid_run_spike(k):
    loss = S.healthy_loss(1200)
    loss[k] *= 5
    found = spikes.detect(S.make_run(loss, S.healthy_grad(1200)))
    assert [(f.kind, f.severity, f.first_step, f.last_step) for f in found] == [
        ("loss_spike", "warning", k, k)]
    assert "clipnorm" in found[0].remedy and found[0].evidence["spikes"][0]["z"] > 6


def test_last_step_spike_is_final_step_spike_only():
    loss = S.healthy_loss(1200)
    loss[-1] *= 4
    found = spikes.detect(S.make_run(loss, S.healthy_grad(1200)))
    assert [(f.kind, f.severity, f.first_step) for f in found] == [("final_step_spike", "warning", 1199)]
    assert "drop_remainder" in found[0].remedy


def test_huge_final_step_spike_is_critical():
    loss = S.healthy_loss(1200)
    loss[-2:] *= 30
    (f,) = spikes.detect(S.make_run(loss))
    assert (f.kind, f.severity, f.first_step, f.last_step) == ("final_step_spike", "critical", 1198, 1199)


def test_spikes_on_ordinary_logs_use_loss_tags():
    rng = np.random.default_rng(0)
    v = 1.0 / np.sqrt(np.arange(1, 61)) * (1 + rng.normal(0, 0.02, 60))
    v[40] *= 3
    run = S.scalar_run({"epoch_loss": v, "epoch_accuracy": 1 - v / 2})
    (f,) = spikes.detect(run)
    assert (f.kind, f.first_step, f.evidence["source"]) == ("loss_spike", 40, "scalar:epoch_loss")
    v[40] /= 3
    v[-1] *= 3
    (f,) = spikes.detect(S.scalar_run({"loss": v}))
    assert (f.kind, f.first_step) == ("final_step_spike", 59)


def test_sustained_blow_up_is_not_a_spike():
    loss = S.healthy_loss(1000)
    loss[600:] *= 20
    assert spikes.detect(S.make_run(loss)) == []


@pytest.mark.parametrize("length", [5, 20, 60])
def test_an_excursion_that_comes_back_is_one_loss_spike(length):
    loss = S.healthy_loss(1000)
    loss[600:600 + length] *= 8
    (f,) = spikes.detect(S.make_run(loss))
    assert (f.kind, f.severity, f.first_step, f.last_step) == (
        "loss_spike", "warning", 600, 600 + length - 1)
    assert (f.evidence["count"], f.evidence["longest_points"]) == (1, length)
    assert f"after {length} points above its range (steps 600-{600 + length - 1}" in f.explanation


def test_an_early_blowup_that_comes_back_is_a_divergence_not_also_a_spike():
    loss = S.healthy_loss(1000)
    loss[100:110] *= 30  # within the first 20% of the run: blowup's, with a warm-up remedy
    run = S.make_run(loss)
    assert [(f.kind, f.first_step) for f in run_all(run) if f.kind in (
        "loss_spike", "divergence")] == [("divergence", 100)]


def test_detectors_accept_empty_run():
    assert run_all(RunData(name="empty")) == []
    run = RunData(name="short", steps={"loss": Series(np.arange(3), np.array([1.0, 2.0, 3.0]))})
    assert run_all(run) == []


@pytest.mark.parametrize(
    "origin,expected_first,text,remedy",
    [
        ({"origin": "layer", "layer": "divide", "variables": []}, "divide",
         "first non-finite output in layer divide", "divide_no_nan"),
        ({"origin": "gradients", "layer": None, "variables": ["sequential/dense_1/kernel"]},
         "sequential/dense_1/kernel", "non-finite gradients of sequential/dense_1/kernel", None),
        ({"origin": "inputs", "layer": None, "variables": []}, None,
         "The input batch of step 150 holds NaN/Inf: ", "isfinite"),
        ({"origin": "labels", "nonfinite_rows": [{"name": "", "rows": [3, 8], "count": 12,
                                                   "of": 64, "values": 12}]}, None,
         "The labels of step 150 hold NaN/Inf (batch rows 3, 8 and 10 more of 64)", "dropna"),
        ({"origin": "sample_weights", "nonfinite_rows": [{"name": "1", "rows": [0], "count": 1,
                                                           "of": 32, "values": 1}]}, None,
         "The sample weights of step 150 hold NaN/Inf (batch row 0 of 32 in 1)",
         "sample weight finite"),
    ],
    ids=["layer", "gradients", "inputs", "labels", "sample-weights"],
)
def test_recorded_origin_leads_layers_explanation_and_remedy(origin, expected_first, text, remedy):
    n, k = 300, 150
    loss, grad = S.healthy_loss(n), S.healthy_grad(n)
    loss[k:] = np.nan
    grad[k:] = np.nan
    nonf = np.zeros(n)
    nonf[k:] = 3
    var = S.per_variable(n)
    var.values[var.steps >= k, :] = np.nan
    run = S.make_run(loss, grad, nonf, variables={"grad_norm": var},
                     json={"stability/nan_origin": [(k, dict(origin, step=k))]})
    (finding,) = [f for f in run_all(run) if f.kind == "nan_inf"]
    if expected_first is not None:
        assert finding.layers[0] == expected_first
    assert text in finding.explanation
    if remedy is not None:
        assert remedy in finding.remedy


def test_every_finding_on_one_exploding_run_suggests_the_same_clipnorm_and_learning_rate():
    import re

    from tb_stability import analysis

    n = 300
    grad = S.healthy_grad(n)
    loss = S.healthy_loss(n)
    grad[200:260] *= np.exp(np.arange(60) * 0.5)  # explodes from step 200
    loss[210:260] *= np.exp(np.arange(50) * 0.4)  # then the loss diverges
    grad[260:], loss[260:] = np.inf, np.nan       # and overflows
    updates = S.per_variable(n, scale=[0.05] * 6)  # kernels move 5% per step: 50x too much
    run = S.make_run(loss, grad, variables={"update_ratio": updates})
    found = {f.kind: f for f in analysis.analyze_run(run)}
    assert {"exploding_gradients", "divergence", "nan_inf"} <= set(found)
    clips = {kind: re.findall(r"clipnorm=([0-9.e+-]+)", found[kind].remedy)
             for kind in ("exploding_gradients", "divergence", "nan_inf", "update_ratio_high")
             if kind in found}
    onset = found["exploding_gradients"].first_step
    assert 200 <= onset <= 210
    expected = 2 * float(np.median(grad[:onset]))  # the healthy stretch before the explosion
    for kind, values in clips.items():
        assert len(values) == 1, (kind, found[kind].remedy)
        assert float(values[0]) == pytest.approx(expected, rel=0.05), kind
    # And the same lower learning rate, from the update ratio at the crossing (~5%: ~50x).
    factor = found["exploding_gradients"].evidence["suggested_lr_factor"]
    assert 20 <= factor <= 100
    for kind in ("exploding_gradients", "divergence", "nan_inf"):
        assert f"learning_rate={1e-3 / factor:.2g}," in found[kind].remedy, found[kind].remedy
        assert f"learning rate {factor:g}x" in found[kind].remedy, found[kind].remedy


@pytest.mark.parametrize("optimizer_config, clip", [
    (None, "clipnorm=1"),
    ({"learning_rate": 0.3, "clipvalue": 0.5}, "clipvalue=0.5"),
], ids=["no-gradient-norms", "clipping-configured"])
def test_divergence_remedy_clips_as_it_says(optimizer_config, clip):
    """'clip gradients' comes with a clip: the run's own where it sets one, else clipnorm=1."""
    from tb_stability.detectors import trends
    rng = np.random.default_rng(0)
    loss = np.concatenate([np.linspace(2.0, 0.5, 100), np.linspace(0.5, 60.0, 100)])
    run = S.scalar_run({"loss": loss * (1 + 0.01 * rng.random(200))})
    if optimizer_config:
        run.model_config = {"optimizer": "SGD", "optimizer_config": optimizer_config}
    (f,) = [f for f in trends.detect_divergence(run) if f.kind == "divergence"]
    assert "clip gradients" in f.remedy
    (call,) = re.findall(r"optimizer = (keras\.optimizers\.\w+\([^)]*\))", f.remedy)
    assert clip in call
