"""gradient_accumulation_steps and steps_per_execution with `StabilityCallback` (real fits).

Semantics checked here (docs/training_setups.md): with
``gradient_accumulation_steps=k`` every micro-batch gets its own row, numbered
by micro-step (0, 1, 2, ... although Keras' ``optimizer.iterations`` counts
updates), with that micro-batch's own loss and gradient; the weights move only
on steps with ``(step + 1) % k == 0``, so the update ratio is 0 on the others,
and the update_ratio_low detector must not read those zeros as "learning rate
too low".
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.test_instrumentation_support import make_model, read_events, step_rows, var_vectors

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402
from tb_stability import schema  # noqa: E402
from tb_stability.analysis import analyze_run  # noqa: E402
from tb_stability.reader import load_logdir  # noqa: E402

BATCH, STEPS, LR, K = 8, 12, 0.01, 3


def _data():
    rng = np.random.RandomState(5)
    x = rng.randn(BATCH * STEPS, 4).astype("float32")
    return x, (x @ rng.randn(4, 1)).astype("float32")


def _reference():
    """Per-micro-batch loss / gradient norm of a tape loop with the same accumulating SGD."""
    x, y = _data()
    model = make_model("functional")
    optimizer = keras.optimizers.SGD(LR, gradient_accumulation_steps=K)
    loss_fn = keras.losses.MeanSquaredError()
    losses, norms = [], []
    for step in range(STEPS):
        xb, yb = x[step * BATCH:(step + 1) * BATCH], y[step * BATCH:(step + 1) * BATCH]
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        losses.append(float(loss))
        norms.append(np.sqrt(sum(float(np.sum(np.square(np.asarray(g, np.float64)))) for g in grads)))
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return np.asarray(losses), np.asarray(norms), [np.asarray(v) for v in model.trainable_variables]


@pytest.mark.parametrize("spe", [1, 2], ids=["spe1", "spe2"])
def test_every_micro_step_gets_its_row_and_weights_move_every_kth_step(tmp_path, spe):
    x, y = _data()
    model = make_model("functional")
    model.compile(keras.optimizers.SGD(LR, gradient_accumulation_steps=K), "mse",
                  steps_per_execution=spe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                  callbacks=[StabilityCallback(str(tmp_path), every=2, nan_forensics=False)])
    notes = [str(w.message) for w in caught if "gradient_accumulation_steps" in str(w.message)]
    assert len(notes) == 1 and "update_ratio is 0" in notes[0]
    events = read_events(tmp_path)
    rows = step_rows(events)
    columns = events[(".", schema.TAG_STEPS)][0].content.names
    assert "clipped" not in columns
    assert rows[:, 0].tolist() == list(range(STEPS))  # micro-steps, each exactly once
    ref_loss, ref_norm, ref_weights = _reference()
    np.testing.assert_allclose(rows[:, columns.index("loss")], ref_loss, rtol=1e-5)
    np.testing.assert_allclose(rows[:, columns.index("grad_norm")], ref_norm, rtol=1e-5)
    for got, want in zip(model.trainable_variables, ref_weights):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
    ratios = var_vectors(events, "update_ratio")
    assert sorted(ratios) == [0, 2, 4, 6, 8, 10]
    for step, ratio in ratios.items():
        kernels = ratio[[0, 2]]  # dense kernels (biases start at 0)
        if (step + 1) % K == 0:
            assert (kernels > 0).all(), step
        else:
            assert (ratio == 0).all(), step

    run = load_logdir(tmp_path).runs["."]
    assert not [f for f in analyze_run(run) if f.kind == "update_ratio_low"]
    # Without the run_info saying "accumulation", the zeros would read as a frozen model:
    del run.json["stability/run_info"]
    assert [f for f in analyze_run(run) if f.kind == "update_ratio_low"]
