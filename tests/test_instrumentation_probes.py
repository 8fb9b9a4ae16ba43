"""Activation probes and data statistics against numpy references, and their findings."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402
from tb_stability.analysis import analyze_logdir  # noqa: E402
from tb_stability.reader import load_run  # noqa: E402
from tests.test_instrumentation_support import read_events  # noqa: E402


def _squash(x):
    return tf.math.tanh(0.5 * x)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _weights(rng):
    """Known weights: unit 0..2 of the ReLU layer dead (bias -50), sigmoid layer huge."""
    w1 = rng.standard_normal((3, 6)).astype("float32")
    b1 = np.array([-50, -50, -50, 0, 0.5, 0], "float32")
    w2 = (rng.standard_normal((6, 4)) * 4).astype("float32")
    b2 = np.zeros(4, "float32")
    w3 = rng.standard_normal((4, 5)).astype("float32")
    b3 = np.zeros(5, "float32")
    w4 = rng.standard_normal((5, 1)).astype("float32")
    return [w1, b1, w2, b2, w3, b3, w4, np.zeros(1, "float32")]


class SubModel(keras.Model):
    def __init__(self):
        super().__init__()
        self.d1 = keras.layers.Dense(6, activation="relu", name="relu_dense")
        self.d2 = keras.layers.Dense(4, activation="sigmoid", name="sig_dense")
        self.d3 = keras.layers.Dense(5, name="lin")
        self.act = keras.layers.Activation(_squash, name="custom")
        self.relu = keras.layers.ReLU(name="relu_layer")
        self.out = keras.layers.Dense(1, name="out")

    def call(self, x):
        return self.out(self.relu(self.act(self.d3(self.d2(self.d1(x))))))


def _model(kind):
    if kind == "subclassed":
        return SubModel()
    layers = [keras.layers.Dense(6, activation="relu", name="relu_dense"),
              keras.layers.Dense(4, activation="sigmoid", name="sig_dense"),
              keras.layers.Dense(5, name="lin"),
              keras.layers.Activation(_squash, name="custom"),
              keras.layers.ReLU(name="relu_layer"),
              keras.layers.Dense(1, name="out")]
    if kind == "sequential":
        return keras.Sequential([keras.Input((3,))] + layers)
    inputs = keras.Input((3,))
    h = inputs
    for layer in layers:
        h = layer(h)
    return keras.Model(inputs, h)


def _reference(weights, x):
    """Per-layer numpy statistics of the forward pass."""
    w1, b1, w2, b2, w3, b3, _, _ = [w.astype(np.float64) for w in weights]
    pre1 = x @ w1 + b1
    a1 = np.maximum(pre1, 0)
    pre2 = a1 @ w2 + b2
    a2 = _sigmoid(pre2)
    lin = a2 @ w3 + b3
    a3 = np.tanh(0.5 * lin)
    a4 = np.maximum(a3, 0)
    return {
        "relu_dense": {"dead": np.mean(~(pre1 > 0).any(axis=0)), "mean": a1.mean(), "std": a1.std()},
        "sig_dense": {"sat": np.mean((np.abs(pre2) >= 5) | (a2 <= 1e-3) | (a2 >= 1 - 1e-3)),
                      "mean": a2.mean(), "std": a2.std()},
        "custom": {"sat": np.mean((a3 <= -1 + 2e-3) | (a3 >= 1 - 2e-3)),
                   "mean": a3.mean(), "std": a3.std()},
        "relu_layer": {"dead": np.mean(~(a3 > 0).any(axis=0)), "mean": a4.mean(), "std": a4.std()},
    }


def known_batch_and_model(kind):
    """``(x, y, model, weights)``: a batch of 32 and a built `_model` with `_weights`
    (not yet set)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3)).astype("float32") * 3
    y = rng.standard_normal((32, 1)).astype("float32")
    model = _model(kind)
    model(x[:1])
    return x, y, model, _weights(rng)


def _fit_frozen(model, weights, x, y, jit, tmp_path, epochs):
    """Fits with known weights and a zero learning rate (one batch per epoch), every=1."""
    model.set_weights(weights)
    model.compile(keras.optimizers.SGD(0.0), "mse", jit_compile=jit)
    model.fit(x, y, batch_size=len(x), epochs=epochs, verbose=0,
              callbacks=[StabilityCallback(str(tmp_path), every=1)])
    return load_run(str(tmp_path))


@pytest.mark.parametrize("kind,jit", [("sequential", False), ("sequential", True),
                                      ("functional", False), ("subclassed", False)])
def test_layer_statistics_match_numpy_reference(kind, jit, tmp_path):
    x, y, model, weights = known_batch_and_model(kind)
    run = _fit_frozen(model, weights, x, y, jit, tmp_path, epochs=1)
    ref = _reference(weights, x.astype(np.float64))
    mean, std = run.layers["act_mean"], run.layers["act_std"]
    assert set(mean.names) == set(ref)  # linear layers are not probed
    for name, expected in ref.items():
        j = mean.names.index(name)
        np.testing.assert_allclose(mean.values[0, j], expected["mean"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(std.values[0, j], expected["std"], rtol=1e-3, atol=1e-5)
    dead = run.layers["dead_fraction"]
    assert sorted(dead.names) == ["relu_dense", "relu_layer"]
    for name in dead.names:
        assert dead.values[0, dead.names.index(name)] == pytest.approx(ref[name]["dead"])
    assert ref["relu_dense"]["dead"] >= 0.5  # the -50 biases
    sat = run.layers["saturated_fraction"]
    assert sorted(sat.names) == ["custom", "sig_dense"]
    for name in sat.names:
        assert sat.values[0, sat.names.index(name)] == pytest.approx(ref[name]["sat"], abs=1e-6)
    assert ref["sig_dense"]["sat"] > 0.3
    # Inputs: per-feature statistics of the (only) batch.
    for row, fn in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max)):
        np.testing.assert_allclose(run.inputs[row].values[0], fn(x, axis=0), rtol=1e-4, atol=1e-5)
    assert run.inputs["mean"].names == ("x[0]", "x[1]", "x[2]")


def test_subclassed_model_built_inside_the_first_step_is_probed(tmp_path):
    """Keras builds an uncalled subclassed model inside the first trace of the step.

    That build runs the layers in Keras' symbolic scope (shape inference, no
    data). Counting those calls made the first trace write no probe table and
    the retrace create one, which TensorFlow forbids: every probe was lost.
    """
    rng = np.random.default_rng(3)
    x = rng.standard_normal((32, 3)).astype("float32") * 3
    y = rng.standard_normal((32, 1)).astype("float32")
    model = SubModel()
    model.compile(keras.optimizers.SGD(0.0), "mse")
    model.fit(x, y, batch_size=len(x), epochs=2, verbose=0,
              callbacks=[StabilityCallback(str(tmp_path), every=1)])
    run = load_run(str(tmp_path))
    info = [i for _, i in run.json["stability/run_info"] if "unprobed_layers" in i][-1]
    assert info["unprobed_layers"] == {}
    ref = _reference(model.get_weights(), x.astype(np.float64))
    mean, std = run.layers["act_mean"], run.layers["act_std"]
    assert set(mean.names) == set(ref) and mean.values.shape[0] == 2
    for name, expected in ref.items():
        j = mean.names.index(name)
        np.testing.assert_allclose(mean.values[:, j], expected["mean"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(std.values[:, j], expected["std"], rtol=1e-3, atol=1e-5)


def test_the_probes_of_one_step_are_written_through_one_table(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3)).astype("float32")
    y = rng.standard_normal((32, 1)).astype("float32")
    model = _model("functional")
    model.compile(keras.optimizers.SGD(0.01), "mse")
    callback = StabilityCallback(str(tmp_path), every=1)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    probes = callback._extras.probes
    (table,) = probes._tables.values()
    assert [p.name for p in table.probes] == ["relu_dense", "sig_dense", "custom", "relu_layer"]
    assert table.fired_spans == [(0, 6), None, None, (6, 11)]  # the ReLU layers' units
    assert all(p.stats is None and p.fired is None for p in probes.probes)  # no own slots
    dead = load_run(str(tmp_path)).layers["dead_fraction"]
    assert list(dead.steps) == [0, 1, 2, 3]


def _rnn_weights(rng):
    """tanh RNN (saturating), ReLU RNN with two dead units, ReLU layer with mean ~1e4."""
    return [(rng.standard_normal((3, 4)) * 3).astype("float32"),
            (rng.standard_normal((4, 4)) * 0.5).astype("float32"),
            np.zeros(4, "float32"),
            rng.standard_normal((4, 5)).astype("float32"),
            (rng.standard_normal((5, 5)) * 0.3).astype("float32"),
            np.array([-50, -50, 0, 0.5, 0], "float32"),
            (rng.standard_normal((5, 3)) * 2).astype("float32"),
            np.full(3, 1e4, "float32"),
            rng.standard_normal((3, 1)).astype("float32"),
            np.zeros(1, "float32")]


def _rnn_reference(weights, x):
    """Statistics over every timestep's activation (the cell runs once per timestep)."""
    k1, u1, b1, k2, u2, b2, k3, b3 = [w.astype(np.float64) for w in weights[:8]]
    h1, h2, pre1, out1, pre2, out2 = np.zeros((len(x), 4)), np.zeros((len(x), 5)), [], [], [], []
    for t in range(x.shape[1]):
        pre = x[:, t] @ k1 + h1 @ u1 + b1
        h1 = np.tanh(pre)
        pre1.append(pre)
        out1.append(h1)
        pre = h1 @ k2 + h2 @ u2 + b2
        h2 = np.maximum(pre, 0)
        pre2.append(pre)
        out2.append(h2)
    pre1, out1, pre2, out2 = map(np.stack, (pre1, out1, pre2, out2))
    offset = np.maximum(h2 @ k3 + b3, 0)
    return {
        "rnn_tanh": {"sat": np.mean((np.abs(pre1) >= 5) | (np.abs(out1) >= 1 - 2e-3)),
                     "mean": out1.mean(), "std": out1.std()},
        "rnn_relu": {"dead": np.mean(~(pre2 > 0).any(axis=(0, 1))),
                     "mean": out2.mean(), "std": out2.std()},
        "offset": {"dead": 0.0, "mean": offset.mean(), "std": offset.std()},
    }


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_rnn_cells_accumulate_every_timestep_and_std_survives_a_large_mean(jit, tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((32, 6, 3)).astype("float32")
    y = rng.standard_normal((32, 1)).astype("float32")
    inputs = keras.Input((6, 3))
    h = keras.layers.SimpleRNN(4, activation="tanh", return_sequences=True,
                               name="rnn_tanh")(inputs)
    h = keras.layers.SimpleRNN(5, activation="relu", name="rnn_relu")(h)
    h = keras.layers.Dense(3, activation="relu", name="offset")(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(h))
    weights = _rnn_weights(rng)
    run = _fit_frozen(model, weights, x, y, jit, tmp_path, epochs=2)
    ref = _rnn_reference(weights, x.astype(np.float64))
    mean, std = run.layers["act_mean"], run.layers["act_std"]
    assert set(mean.names) == set(ref)
    assert list(mean.steps) == [0, 1]  # the second step's slot starts from zero again
    for name, expected in ref.items():
        j = mean.names.index(name)
        for step in (0, 1):
            np.testing.assert_allclose(mean.values[step, j], expected["mean"], rtol=1e-4)
            np.testing.assert_allclose(std.values[step, j], expected["std"], rtol=1e-3)
    assert 0.5 < ref["offset"]["std"] < 1e3 <= ref["offset"]["mean"]
    dead = run.layers["dead_fraction"]
    assert sorted(dead.names) == ["offset", "rnn_relu"]
    assert dead.values[1, dead.names.index("rnn_relu")] == pytest.approx(ref["rnn_relu"]["dead"])
    assert ref["rnn_relu"]["dead"] == pytest.approx(0.4)  # the -50 biases
    sat = run.layers["saturated_fraction"]
    assert sat.names == ("rnn_tanh",)
    assert sat.values[1, 0] == pytest.approx(ref["rnn_tanh"]["sat"], abs=1e-6)
    assert ref["rnn_tanh"]["sat"] > 0.1


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_a_sigmoid_rnn_cell_bounds_off_zero_match_numpy_at_every_timestep(jit, tmp_path):
    # The sigmoid's saturation bounds are not centred on 0 (the tanh's, in
    # the test above, are): |out - middle| >= half, inside the time loop.
    rng = np.random.default_rng(4)
    x = rng.standard_normal((16, 5, 3)).astype("float32")
    y = rng.standard_normal((16, 1)).astype("float32")
    inputs = keras.Input((5, 3))
    h = keras.layers.SimpleRNN(4, activation="sigmoid", name="rnn_sigmoid")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(h))
    weights = [(rng.standard_normal((3, 4)) * 0.5).astype("float32"),
               (rng.standard_normal((4, 4)) * 0.5).astype("float32"),
               np.array([-50, 0, 0.5, 20], "float32"),
               rng.standard_normal((4, 1)).astype("float32"), np.zeros(1, "float32")]
    run = _fit_frozen(model, weights, x, y, jit, tmp_path, epochs=1)
    k, u, b = [w.astype(np.float64) for w in weights[:3]]
    state, pres, outs = np.zeros((len(x), 4)), [], []
    for t in range(x.shape[1]):
        pre = x[:, t].astype(np.float64) @ k + state @ u + b
        state = _sigmoid(pre)
        pres.append(pre)
        outs.append(state)
    pres, outs = np.stack(pres), np.stack(outs)
    assert 0.4 < np.mean(np.abs(pres) >= 5) < 0.6  # the -50 and +20 biases
    np.testing.assert_allclose(run.layers["act_mean"].values[0, 0], outs.mean(), rtol=1e-5)
    np.testing.assert_allclose(run.layers["act_std"].values[0, 0], outs.std(), rtol=1e-3)
    assert run.layers["saturated_fraction"].values[0, 0] == pytest.approx(
        np.mean(np.abs(pres) >= 5), abs=1e-6)


def _lstm_reference(weights, x, activation):
    """Every call of an LSTM cell's activation, two per timestep: ``(pres, outs, hs)``.

    Keras' cell: ``z = x k + h u + b`` split into gates i, f, c, o;
    ``c = f * c + i * act(z_c)``, ``h = o * act(c)``. ``hs`` is the output
    sequence ``[batch, time, units]``.
    """
    k, u, b = [w.astype(np.float64) for w in weights]
    units = u.shape[0]
    h, c = np.zeros((len(x), units)), np.zeros((len(x), units))
    pres, outs, hs = [], [], []
    for t in range(x.shape[1]):
        z = x[:, t] @ k + h @ u + b
        zi, zf, zc, zo = np.split(z, 4, axis=1)
        candidate = activation(zc)
        c = _sigmoid(zf) * c + _sigmoid(zi) * candidate
        squashed = activation(c)
        h = _sigmoid(zo) * squashed
        pres += [zc, c]
        outs += [candidate, squashed]
        hs.append(h)
    return np.stack(pres), np.stack(outs), np.stack(hs, axis=1)


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_lstm_cells_two_activation_calls_per_timestep_match_numpy(jit, tmp_path):
    # An LSTM cell calls its activation twice per timestep (the candidate and
    # the cell state), each call adding its means into the step's slot: the
    # statistics must be those over every call, for a tanh and a sigmoid cell.
    rng = np.random.default_rng(6)
    steps = 6
    x = rng.standard_normal((16, steps, 3)).astype("float32")
    y = rng.standard_normal((16, 1)).astype("float32")
    inputs = keras.Input((steps, 3))
    h = keras.layers.LSTM(4, activation="tanh", return_sequences=True, name="lstm_tanh")(inputs)
    h = keras.layers.LSTM(3, activation="sigmoid", name="lstm_sigmoid")(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(h))
    tanh_weights = [(rng.standard_normal((3, 16)) * 0.8).astype("float32"),
                    (rng.standard_normal((4, 16)) * 0.5).astype("float32"),
                    np.concatenate([np.zeros(8), [20, -20, 0, 0.5], np.zeros(4)]).astype("float32")]
    sigmoid_weights = [(rng.standard_normal((4, 12)) * 0.8).astype("float32"),
                       (rng.standard_normal((3, 12)) * 0.5).astype("float32"),
                       np.concatenate([np.zeros(6), [-50, 0, 3], np.zeros(3)]).astype("float32")]
    callback = StabilityCallback(str(tmp_path), every=1)
    model.set_weights(tanh_weights + sigmoid_weights
                      + [rng.standard_normal((3, 1)).astype("float32"), np.zeros(1, "float32")])
    model.compile(keras.optimizers.SGD(0.0), "mse", jit_compile=jit)
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, callbacks=[callback])
    run = load_run(str(tmp_path))

    pres, outs, sequence = _lstm_reference(tanh_weights, x.astype(np.float64), np.tanh)
    sig_pres, sig_outs, _ = _lstm_reference(sigmoid_weights, sequence, _sigmoid)
    mean, std, sat = (run.layers[q] for q in ("act_mean", "act_std", "saturated_fraction"))
    assert sorted(mean.names) == ["lstm_sigmoid", "lstm_tanh"]
    expected = {
        "lstm_tanh": (outs, (np.abs(pres) >= 5) | (np.abs(outs) >= 1 - 2e-3)),
        "lstm_sigmoid": (sig_outs, (np.abs(sig_pres) >= 5) | (sig_outs <= 1e-3)
                         | (sig_outs >= 1 - 1e-3)),
    }
    for name, (values, saturated) in expected.items():
        np.testing.assert_allclose(mean.values[0, mean.names.index(name)], values.mean(),
                                   rtol=1e-5)
        np.testing.assert_allclose(std.values[0, std.names.index(name)], values.std(),
                                   rtol=1e-3)
        assert sat.values[0, sat.names.index(name)] == pytest.approx(saturated.mean(), abs=1e-6)
        assert 0.05 < saturated.mean() < 0.95  # the large gate biases
    for probe in callback._extras.probes.probes:  # one row of means per call
        assert probe.means.numpy()[:, 0].max() == 2 * steps, probe.name


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_layer_called_twice_in_a_step_is_summed_over_both_calls(jit, tmp_path):
    # A shared layer's two calls add up in one slot (additive rows); a layer
    # called once writes a row centred on its own mean. Both against numpy,
    # with a mean of ~1e4 and a std of ~1 in the shared layer.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((32, 4)).astype("float32")
    y = rng.standard_normal((32, 1)).astype("float32")
    shared = keras.layers.Dense(4, activation="relu", name="shared")
    inputs = keras.Input((4,))
    h = keras.layers.Dense(4, activation="relu", name="once")(inputs)
    h = shared(shared(h) * 1e-4)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(h))
    w_once = rng.standard_normal((4, 4)).astype("float32")
    b_once = np.array([-50, 0, 0, 0.5], "float32")
    w_shared = (rng.standard_normal((4, 4)) * 0.5).astype("float32")
    b_shared = np.array([1e4, 1e4, -50, 1e4], "float32")
    weights = [w_once, b_once, w_shared, b_shared,
               rng.standard_normal((4, 1)).astype("float32"), np.zeros(1, "float32")]
    run = _fit_frozen(model, weights, x, y, jit, tmp_path, epochs=1)
    w = [v.astype(np.float64) for v in weights]
    pre_once = x.astype(np.float64) @ w[0] + w[1]
    once = np.maximum(pre_once, 0)
    pre_first = once @ w[2] + w[3]
    first = np.maximum(pre_first, 0)
    pre_second = (first * 1e-4) @ w[2] + w[3]
    both = np.concatenate([first, np.maximum(pre_second, 0)])
    fired = (pre_first > 0).any(axis=0) | (pre_second > 0).any(axis=0)
    mean, std = run.layers["act_mean"], run.layers["act_std"]
    dead = run.layers["dead_fraction"]
    expected = {"once": (once.mean(), once.std(), np.mean(~(pre_once > 0).any(axis=0))),
                "shared": (both.mean(), both.std(), np.mean(~fired))}
    assert set(mean.names) == set(expected)
    for name, (m, s, d) in expected.items():
        j = mean.names.index(name)
        np.testing.assert_allclose(mean.values[0, j], m, rtol=1e-5)
        np.testing.assert_allclose(std.values[0, j], s, rtol=1e-3)
        assert dead.values[0, dead.names.index(name)] == pytest.approx(d)
    assert both.mean() > 1e3 and expected["shared"][2] == 0.25


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_small_relu_layer_counts_a_unit_that_fires_once_and_barely(jit, tmp_path):
    # A small plain-ReLU layer's per-unit sums serve as "fired" and give its
    # mean: a unit whose only positive output is ~1e-4, on one example of 32,
    # is alive; one with a -50 bias is dead; a leaky ReLU beside it (may be
    # negative) takes "fired" from its per-unit maximum. All against numpy.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((32, 3)).astype("float32")
    w = rng.standard_normal((3, 8)).astype("float32")
    b = np.zeros(8, "float32")
    w[:, 2] = [1.0, 0.0, 0.0]
    b[2] = np.float32(1e-4) - x[:, 0].max()  # positive on one example only
    b[3] = -50.0
    leaky_w = rng.standard_normal((8, 4)).astype("float32")
    leaky_b = np.array([-50, 0, 0, 0], "float32")
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(8, activation="relu", name="small_relu"),
        keras.layers.Dense(4, activation=keras.activations.leaky_relu, name="small_leaky"),
        keras.layers.Dense(1, name="out")])
    weights = [w, b, leaky_w, leaky_b, np.ones((4, 1), "float32"), np.zeros(1, "float32")]
    run = _fit_frozen(model, weights, x, np.zeros((32, 1), "float32"), jit, tmp_path, epochs=1)
    pre = x.astype(np.float64) @ w + b
    relu = np.maximum(pre, 0)
    assert (pre[:, 2] > 0).sum() == 1 and 0 < relu[:, 2].max() < 1e-3
    leaky_pre = relu @ leaky_w + leaky_b
    leaky = np.where(leaky_pre > 0, leaky_pre, 0.2 * leaky_pre)
    expected = {"small_relu": (relu, np.mean(~(pre > 0).any(axis=0))),
                "small_leaky": (leaky, np.mean(~(leaky_pre > 0).any(axis=0)))}
    mean, std, dead = (run.layers[q] for q in ("act_mean", "act_std", "dead_fraction"))
    assert set(mean.names) == set(expected) == set(dead.names)
    for name, (out, dead_fraction) in expected.items():
        np.testing.assert_allclose(mean.values[0, mean.names.index(name)], out.mean(),
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(std.values[0, std.names.index(name)], out.std(),
                                   rtol=1e-3, atol=1e-6)
        assert dead.values[0, dead.names.index(name)] == pytest.approx(dead_fraction)
    assert dead.values[0, dead.names.index("small_relu")] == pytest.approx(1 / 8)
    assert dead.values[0, dead.names.index("small_leaky")] == pytest.approx(1 / 4)


def _conv_valid(x, kernel, bias):
    """``Conv2D`` (channels last, valid padding, stride 1) in float64 numpy."""
    kh, kw = kernel.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    return np.einsum("nijkab,abkc->nijc", windows, kernel) + bias


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_large_convolution_activations_match_numpy(jit, tmp_path):
    # Activations of >= LARGE_EXAMPLE elements per example keep raw sums (no
    # centring pass) unless they would cancel: a ReLU conv (dead channels from
    # -50 biases, fired from its per-channel sums), a conv whose outputs sit at
    # ~1e4 with a std of ~2 (the guard centres it), a leaky ReLU conv (may be
    # negative: fired from the per-channel maximum). All against numpy.
    rng = np.random.default_rng(11)
    x = rng.standard_normal((16, 12, 12, 4)).astype("float32")
    y = rng.standard_normal((16, 1)).astype("float32")
    inputs = keras.Input((12, 12, 4))
    h = keras.layers.Conv2D(32, 3, activation="relu", name="conv_relu")(inputs)
    offset = keras.layers.Conv2D(32, 1, activation="relu", name="conv_offset")(h)
    leaky = keras.layers.Conv2D(32, 1, activation="leaky_relu", name="conv_leaky")(h)
    flat = keras.layers.Concatenate()([keras.layers.Flatten()(offset * 1e-4),
                                       keras.layers.Flatten()(leaky)])
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(flat))
    k1 = (rng.standard_normal((3, 3, 4, 32)) * 0.3).astype("float32")
    b1 = np.where(np.arange(32) % 4 == 0, -50.0, 0.1).astype("float32")
    k2 = (rng.standard_normal((1, 1, 32, 32)) * 0.5).astype("float32")
    b2 = np.full(32, 1e4, "float32")
    k3 = rng.standard_normal((1, 1, 32, 32)).astype("float32")
    b3 = np.where(np.arange(32) < 3, -50.0, 0.0).astype("float32")
    weights = [k1, b1, k2, b2, k3, b3,
               (rng.standard_normal((2 * 10 * 10 * 32, 1)) * 0.01).astype("float32"),
               np.zeros(1, "float32")]
    run = _fit_frozen(model, weights, x, y, jit, tmp_path, epochs=1)
    w = [v.astype(np.float64) for v in weights]
    pre1 = _conv_valid(x.astype(np.float64), w[0], w[1])
    a1 = np.maximum(pre1, 0)
    pre2 = _conv_valid(a1, w[2], w[3])
    pre3 = _conv_valid(a1, w[4], w[5])
    a3 = np.where(pre3 > 0, pre3, 0.2 * pre3)  # keras' leaky_relu slope
    expected = {"conv_relu": (a1, pre1), "conv_offset": (np.maximum(pre2, 0), pre2),
                "conv_leaky": (a3, pre3)}
    mean, std, dead = (run.layers[q] for q in ("act_mean", "act_std", "dead_fraction"))
    assert set(mean.names) == set(expected) == set(dead.names)
    for name, (out, pre) in expected.items():
        j = mean.names.index(name)
        np.testing.assert_allclose(mean.values[0, j], out.mean(), rtol=1e-5)
        np.testing.assert_allclose(std.values[0, j], out.std(), rtol=1e-3)
        assert dead.values[0, dead.names.index(name)] == pytest.approx(
            np.mean(~(pre > 0).any(axis=(0, 1, 2))))
    assert dead.values[0, dead.names.index("conv_relu")] == pytest.approx(0.25)
    assert dead.values[0, dead.names.index("conv_leaky")] == pytest.approx(3 / 32)
    assert expected["conv_offset"][0].mean() > 1e3 > 1 < expected["conv_offset"][0].std()


@pytest.mark.parametrize("offset,centred", [(0.0, False), (1e4, True)],
                         ids=["raw-sums", "cancelling-centred"])
def test_large_single_call_keeps_raw_sums_unless_they_cancel(offset, centred):
    from instrumentation.probe_state import LARGE_EXAMPLE, Probe

    probe = Probe("conv", "relu", None, False, "relu")
    probe.nonnegative = True
    values = np.random.default_rng(3).random((8, 16, 16, 16)).astype("float32") + offset
    assert values[0].size >= LARGE_EXAMPLE
    row, fired = tf.function(lambda v: probe.contribution(None, v, centered=True))(values)
    row = row.numpy()
    count, first, half, center = row[1], row[3], row[4], row[5]
    shift = first / count  # as `Probe.values_of` reads a row
    exact = values.astype(np.float64)
    np.testing.assert_allclose(center + shift, exact.mean(), rtol=1e-6)
    np.testing.assert_allclose(2 * half / count - shift ** 2, exact.var(), rtol=1e-3)
    assert (center != 0) == centred
    np.testing.assert_allclose(fired.numpy(), exact.sum(axis=(0, 1, 2)), rtol=1e-4)


def test_probes_run_every_n_steps_only_and_leave_eval_untouched(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((160, 3)).astype("float32")
    y = rng.standard_normal((160, 1)).astype("float32")
    model = _model("sequential")
    model.compile("adam", "mse")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, validation_split=0.2,
              callbacks=[StabilityCallback(str(tmp_path), every=4)])
    run = load_run(str(tmp_path))
    steps = run.layers["act_mean"].steps
    assert list(steps) == list(range(0, 16, 4))
    assert {"epoch_loss", "epoch_val_loss"} <= set(run.scalars)
    assert len(run.scalars["epoch_loss"]) == 2
    # After fit the layers are unwrapped and serialise normally.
    assert model.layers[0].get_config()["activation"] == "relu"
    assert "activation" not in vars(model.layers[0]) or \
        getattr(model.layers[0].activation, "__wrapped__", None) is None


def _findings(tmp_path, model, x, y, loss, epochs=3, **fit):
    model.compile(keras.optimizers.Adam(1e-3), loss)
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0,
              callbacks=[StabilityCallback(str(tmp_path), every=2)], **fit)
    return {f.kind: f for run in analyze_logdir(str(tmp_path)).runs for f in run.findings}


def test_dead_relu_layer_is_named(tmp_path):
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).standard_normal((128, 4)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")
    model = keras.Sequential([keras.Input((4,)),
                              keras.layers.Dense(16, activation="relu", name="dead",
                                                 bias_initializer=keras.initializers.Constant(-100)),
                              keras.layers.Dense(1, activation="sigmoid")])
    found = _findings(tmp_path, model, x, y, "binary_crossentropy")
    assert found["dead_units"].layers == ["dead"]


def test_saturated_sigmoid_layer_is_named(tmp_path):
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).standard_normal((128, 4)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(16, activation="sigmoid", name="sat",
                           kernel_initializer=keras.initializers.RandomNormal(stddev=50.0)),
        keras.layers.Dense(1, activation="sigmoid")])
    found = _findings(tmp_path, model, x, y, "binary_crossentropy")
    assert found["saturated_activations"].layers == ["sat"]
    assert "dead_units" not in found


def test_unscaled_inputs_and_imbalanced_labels_are_found(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 5)).astype("float32") * 1000
    y = (rng.random((256, 1)) < 0.04).astype("float32")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    found = _findings(tmp_path, model, x, y, "binary_crossentropy", epochs=2)
    assert "unscaled_inputs" in found
    assert "class_imbalance" in found
    run = load_run(str(tmp_path))
    assert run.labels.names == ("0", "1")
    assert run.labels.values.sum() == 32 * len(run.labels)


def test_sparse_softmax_counts_classes(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)).astype("float32")
    y = np.array([0, 1, 2, 2] * 16)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=64, epochs=1, verbose=0,
              callbacks=[StabilityCallback(str(tmp_path), every=1)])
    run = load_run(str(tmp_path))
    np.testing.assert_array_equal(run.labels.values[0], [16, 16, 32])
    assert run.predictions.values[0].sum() == 64


def test_a_second_fit_after_recompiling_writes_its_own_probe_steps(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3)).astype("float32")
    y = rng.standard_normal((32, 1)).astype("float32")
    model = _model("functional")
    callback = StabilityCallback(str(tmp_path), every=1)
    for _ in range(2):  # a fresh optimizer: its iterations start again at 0
        model.compile(keras.optimizers.SGD(0.01), "mse")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    # The second fit's probes continue the run's steps, as its per-step rows do.
    events = read_events(tmp_path)
    steps = [e.step for e in events[(".", "stability/layer/act_mean")]]
    assert steps == list(range(8))
    assert sorted(int(s) for e in events[(".", "stability/steps")] for s in e.value[:, 0]) == steps
