"""`StabilityMonitor` in hand-written GradientTape loops, with and without XLA."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_instrumentation_support import (
    column,
    data,
    make_model,
    read_events,
    reference_run,
    run_infos,
    step_rows,
    var_vectors,
)

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityMonitor  # noqa: E402
from tb_stability import schema  # noqa: E402

LR = 0.05
BATCH = 8


def train(monitor_dir, x, y, every=2, jit=False, tick=True, features=4, pass_model=False,
          **monitor_args):
    model = make_model("functional", features)
    optimizer = keras.optimizers.SGD(LR)
    loss_fn = keras.losses.MeanSquaredError()
    monitor = StabilityMonitor(str(monitor_dir), every=every, optimizer=optimizer,
                               jit_compile=jit, model=model if pass_model else None,
                               **monitor_args)

    @tf.function(jit_compile=jit)
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        monitor.observe(loss, grads, model.trainable_variables)
        return loss

    with monitor:
        for i in range(len(x) // BATCH):
            step(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])
            if tick:
                monitor.tick()
    return model, monitor


@pytest.mark.parametrize("jit,features", [(False, 4), (True, 4), (True, 256)],
                         ids=["graph", "xla", "xla-wide-kernel"])
def test_monitor_matches_reference(tmp_path, jit, features):
    """``features=256``: a 1,280-value kernel, summed by a product with ones under XLA."""
    x, y = data(features=features)
    steps = len(x) // BATCH
    train(tmp_path, x, y, every=2, jit=jit, features=features)
    ref = reference_run(x, y, LR, BATCH, steps, features=features)
    events = read_events(tmp_path)
    expected = {(".", schema.TAG_STEPS), (".", schema.TAG_RUN_INFO)} | {
        (".", schema.variable_tag(q)) for q in schema.VARIABLE_QUANTITIES
    }
    assert set(events) == expected
    rows = step_rows(events)
    assert column(rows, "step").tolist() == list(range(steps))
    np.testing.assert_allclose(column(rows, "loss"), ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(column(rows, "grad_norm"), ref["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(column(rows, "learning_rate"), LR, rtol=1e-6)
    grads, weights = var_vectors(events, "grad_norm"), var_vectors(events, "weight_norm")
    ratios = var_vectors(events, "update_ratio")
    assert sorted(grads) == list(range(0, steps, 2))
    for s in grads:
        np.testing.assert_allclose(grads[s], ref["var_grad"][s], rtol=1e-5)
        np.testing.assert_allclose(weights[s], ref["var_weight"][s], rtol=1e-5)
        np.testing.assert_allclose(ratios[s], ref["var_ratio"][s], rtol=1e-4, atol=1e-9)
    assert run_infos(events)[0]["optimizer"] == "SGD"


def test_monitor_nan_and_close_without_ticks(tmp_path):
    x, y = data()
    x = x.copy()
    x[2 * BATCH, 1] = np.inf  # step 2 produces non-finite values
    _, monitor = train(tmp_path, x, y, every=3, tick=False)  # capacity 37 >= 6 steps
    rows = step_rows(read_events(tmp_path))
    assert column(rows, "step").tolist() == list(range(6))
    nonfinite = column(rows, "nonfinite_grads")
    assert (nonfinite[:2] == 0).all() and (nonfinite[2:] > 0).all()
    assert monitor.first_nonfinite_step == 2


def test_monitor_warns_when_steps_are_dropped(tmp_path):
    x, y = data(n=96)  # 12 steps, never ticked
    with pytest.warns(RuntimeWarning, match=r"overwritten .* must call StabilityMonitor\.tick\(\)"):
        train(tmp_path, x, y, every=2, tick=False, capacity=5)
    steps = column(step_rows(read_events(tmp_path)), "step").tolist()
    assert steps == list(range(7, 12))


def test_monitor_records_the_layer_activations_of_a_model_it_is_given(tmp_path):
    x, y = data()
    model, _ = train(tmp_path / "with", x, y, pass_model=True)
    (info,) = run_infos(read_events(tmp_path / "with"))
    table = info["layer_activations"]
    dense = [layer for layer in model.layers if hasattr(layer, "activation")]
    assert dense and set(table) == {layer.path for layer in dense}
    for layer in dense:
        assert table[layer.path]["class"] == type(layer).__name__
        assert table[layer.path]["activation"] == layer.activation.__name__
    train(tmp_path / "without", x, y)
    (info,) = run_infos(read_events(tmp_path / "without"))
    assert "layer_activations" not in info


def test_monitor_every_step_reads_the_host_every_32_ticks(tmp_path, monkeypatch):
    """``every=1`` logs every step but reads the device-side records every 32 ticks, as the
    callback does: a read per step doubled a small MLP's step (benchmarks/overhead_loop.py)."""
    drains = []
    original = StabilityMonitor._drain
    monkeypatch.setattr(StabilityMonitor, "_drain",
                        lambda self: (drains.append(self._counter.numpy()), original(self))[1])
    x, y = data(n=70 * BATCH)
    _, monitor = train(tmp_path, x, y, every=1)
    assert monitor.read_every == 32 and monitor.capacity == 34
    # Two reads while training (after 32 and 64 ticks), one when closing; a time-based
    # flush (5 s) may add one on a slow machine.
    assert drains[:2] == [32, 64] and len(drains) <= 4, drains
    steps = column(step_rows(read_events(tmp_path)), "step").tolist()
    assert steps == list(range(70))
    with pytest.raises(ValueError, match="read_every"):
        StabilityMonitor(str(tmp_path / "bad"), read_every=0)
