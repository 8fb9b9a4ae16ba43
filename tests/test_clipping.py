"""clipnorm / global_clipnorm / clipvalue with `StabilityCallback`: real `model.fit` runs.

The reported ``grad_norm`` must be the PRE-clip norm and the ``clipped``
column 1 exactly on the steps where the pre-clip norm exceeded the threshold
(any variable's norm for ``clipnorm``, the global norm for ``global_clipnorm``),
checked against a GradientTape loop that trains an identical model with the
same clipping optimizer.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.test_instrumentation_support import make_model, read_events, step_rows

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402
from tb_stability import schema  # noqa: E402
from tb_stability.analysis import analyze_run  # noqa: E402
from tb_stability.reader import load_logdir  # noqa: E402
from tb_stability.writer import StabilityWriter  # noqa: E402

BATCH, STEPS, LR = 8, 10, 0.05


def _data():
    rng = np.random.RandomState(3)
    x = rng.randn(BATCH * STEPS, 4).astype("float32")
    y = (x @ rng.randn(4, 1) * 3.0).astype("float32")
    x[::7] *= 0.2  # a few quiet batches so some steps stay under the threshold
    return x, y


def _reference(clip: dict):
    """Pre-clip global and per-variable gradient norms of a tape loop with the same clipping."""
    x, y = _data()
    model = make_model("functional")
    optimizer = keras.optimizers.SGD(LR, **clip)
    loss_fn = keras.losses.MeanSquaredError()
    norms, per_var = [], []
    for step in range(STEPS):
        xb, yb = x[step * BATCH:(step + 1) * BATCH], y[step * BATCH:(step + 1) * BATCH]
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        g64 = [np.asarray(g, np.float64) for g in grads]
        per_var.append([np.linalg.norm(g) for g in g64])
        norms.append(np.sqrt(sum((g ** 2).sum() for g in g64)))
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return np.asarray(norms), np.asarray(per_var)


def _fit(log_dir, clip: dict, every=5, fits=1):
    x, y = _data()
    model = make_model("functional")
    model.compile(keras.optimizers.SGD(LR, **clip), "mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback = StabilityCallback(str(log_dir), every=every, nan_forensics=False)
        for _ in range(fits):
            model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                      callbacks=[callback])
    events = read_events(log_dir)
    block = events[(".", schema.TAG_STEPS)]
    columns = block[0].content.names
    rows = step_rows(events)[:STEPS]  # the first fit
    table = {name: rows[:, columns.index(name)] for name in columns}
    return table, [str(w.message) for w in caught if "tb-stability" in str(w.message)]


@pytest.mark.parametrize("clip", [{"clipnorm": 8.0}, {"global_clipnorm": 12.0}],
                         ids=["clipnorm", "global_clipnorm"])
def test_grad_norm_is_pre_clip_and_clipped_marks_exactly_the_clipped_steps(tmp_path, clip):
    ref_global, ref_per_var = _reference(clip)
    table, _ = _fit(tmp_path, clip)
    assert table["step"].tolist() == list(range(STEPS))
    np.testing.assert_allclose(table["grad_norm"], ref_global, rtol=1e-5)
    if "clipnorm" in clip:
        expected = (ref_per_var > clip["clipnorm"]).any(axis=1)
    else:
        expected = ref_global > clip["global_clipnorm"]
    assert 0 < expected.sum() < STEPS, "thresholds must make some steps clip and others not"
    assert table["clipped"].tolist() == expected.astype(float).tolist()
    # the norms above the threshold really are pre-clip (a post-clip norm could not exceed it)
    assert table["grad_norm"].max() > (clip.get("global_clipnorm") or clip["clipnorm"])


def test_clipvalue_has_no_clipped_column_and_says_so_once(tmp_path):
    table, messages = _fit(tmp_path, {"clipvalue": 0.5}, fits=2)
    assert "clipped" not in table
    notes = [m for m in messages if "clipvalue" in m]
    assert len(notes) == 1 and "not reported" in notes[0]  # once, although fit ran twice
    ref_global, _ = _reference({"clipvalue": 0.5})
    np.testing.assert_allclose(table["grad_norm"], ref_global, rtol=1e-5)  # pre-clip


def _nan_run(tmp_path, optimizer_config):
    """A written run whose gradients explode and then go NaN at step 30."""
    steps = np.arange(40)
    grad = np.where(steps < 20, 1.0, 1.0 * 2.0 ** (steps - 19))
    grad[30:] = np.nan
    loss = np.where(steps < 30, 1.0, np.nan)
    block = np.stack([steps, loss, grad, np.where(steps >= 30, 5.0, 0.0), np.full(40, 0.1)], 1)
    with StabilityWriter(tmp_path) as writer:
        writer.write_json(schema.TAG_RUN_INFO, 0, {"optimizer": "Adam",
                                                   "optimizer_config": optimizer_config})
        writer.write_steps(block, schema.STEP_COLUMNS)
    return load_logdir(tmp_path).runs["."]


def test_nan_inf_remedy_does_not_suggest_clipnorm_when_already_clipping(tmp_path):
    clipped = [f for f in analyze_run(_nan_run(tmp_path / "a", {"global_clipnorm": 1.0}))
               if f.kind == "nan_inf"]
    plain = [f for f in analyze_run(_nan_run(tmp_path / "b", {"clipnorm": None}))
             if f.kind == "nan_inf"]
    assert clipped[0].severity == plain[0].severity == "critical"
    assert "already clipped (global_clipnorm=1)" in clipped[0].remedy
    assert clipped[0].evidence["configured_clipping"] == {"global_clipnorm": 1.0}
    assert "Clip gradients" in plain[0].remedy and "already" not in plain[0].remedy


def _regression_fit(logdir, optimizer):
    data = np.random.default_rng(0)
    x = data.normal(size=(4096, 10)).astype("float32")
    y = (x @ data.normal(size=(10, 1))).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer, "mse")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clipvalue's "no clipped column" note
        history = model.fit(x, y, batch_size=32, epochs=3, verbose=0,
                            callbacks=[StabilityCallback(str(logdir), every=10)])
    (run,) = load_logdir(str(logdir)).runs.values()
    return {f.kind: f for f in analyze_run(run)}, history.history["loss"][-1]


@pytest.mark.parametrize("clip", [{"clipvalue": 1e-6}, {"global_clipnorm": 1e-4}],
                         ids=["clipvalue-1e-6", "global_clipnorm-1e-4"])
def test_a_clip_far_below_the_gradients_is_named_instead_of_raising_the_rate(tmp_path, clip):
    """SGD at 0.01 with clipvalue=1e-6 was told "raise the learning rate ~1x" twice: 0.01 is the
    cap of a raised rate, and its float32 value 0.0099999998 read as below it."""
    found, stuck_loss = _regression_fit(tmp_path / "clipped", keras.optimizers.SGD(0.01, **clip))
    for kind in ("stalled", "update_ratio_low"):
        remedy = found[kind].remedy
        assert remedy.startswith("Gradient clipping holds every step back"), remedy
        assert "Raise the learning rate" not in remedy and "~1x" not in remedy
    snippet = found["stalled"].remedy.splitlines()[-1].strip()
    assert snippet.startswith("optimizer = keras.optimizers.SGD(learning_rate=0.01, clipnorm=")
    fixed = eval(snippet[len("optimizer = "):], {"keras": keras})
    found, loss = _regression_fit(tmp_path / "fixed", fixed)
    assert not {"stalled", "update_ratio_low"} & set(found)
    assert loss < 0.01 * stuck_loss


def test_a_rate_at_the_cap_in_float32_is_not_raised():
    from tb_stability.detectors import _remedies

    assert _remedies.raised_learning_rate(np.float32(0.01), 1e4) == (None, None)
    assert _remedies.raised_learning_rate(1e-4, 10.0) == (1e-3, 10.0)
