"""`StabilityMonitor`'s update ratio from the optimizer's own update tensors, and its fallbacks.

With a Keras optimizer the monitor wraps ``optimizer.apply`` and, where the
update is the only write to each weight in the traced step, takes ``|Δw|``
from the update tensors and ``w(s-1)`` as ``w(s) - Δw``: no copy of the
weights. Every test checks the recorded weight norms and update ratios
against the weights the host read before and after each step.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_instrumentation_support import data, make_model, read_events, var_vectors

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityMonitor, update_capture  # noqa: E402
from instrumentation.weight_copies import copied_values  # noqa: E402

BATCH = 8

OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.05),
    "sgd-momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01),
}


def host_norms(before, after):
    """Reference weight norms and update ratios of one step, in float64 (ratio 0 at |w| = 0)."""
    weight = np.array([np.linalg.norm(np.float64(b)) for b in before])
    change = np.array([np.linalg.norm(np.float64(a) - np.float64(b))
                       for a, b in zip(after, before)])
    return weight, np.divide(change, weight, out=np.zeros_like(change), where=weight > 0)


def run(log_dir, optimizer, steps_fns, every=1, x=None, y=None):
    """Trains with ``steps_fns[i % len]`` at step i; returns the host reference per step.

    Each entry of ``steps_fns`` is ``make(model, optimizer, monitor) -> tf.function``.
    """
    if x is None:
        x, y = data(n=8 * BATCH)
    model = make_model("functional")
    monitor = StabilityMonitor(str(log_dir), every=every, optimizer=optimizer)
    fns = [make(model, optimizer, monitor) for make in steps_fns]
    reference = {}
    with monitor:
        for i in range(len(x) // BATCH):
            before = [v.numpy() for v in model.trainable_variables]
            fns[i % len(fns)](x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])
            monitor.tick()
            reference[i] = host_norms(before, [v.numpy() for v in model.trainable_variables])
    return model, monitor, reference


def plain_step(model, optimizer, monitor, after_update=None, before_update=None):
    loss_fn = keras.losses.MeanSquaredError()

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        if before_update is not None:
            before_update(model)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        if after_update is not None:
            after_update(model)
        monitor.observe(loss, grads, model.trainable_variables)
        return loss

    return step


def clip_weights(model):
    for variable in model.trainable_variables:
        variable.assign(tf.clip_by_value(variable, -0.3, 0.3))


def recorded(log_dir):
    events = read_events(log_dir)
    return var_vectors(events, "weight_norm"), var_vectors(events, "update_ratio")


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("watched", [True, False], ids=["update-tensors", "weight-copy"])
def test_update_ratio_matches_the_host(tmp_path, monkeypatch, name, watched):
    if not watched:
        monkeypatch.setattr(update_capture, "expected", lambda *a: False)
    optimizer = OPTIMIZERS[name]()
    model, monitor, reference = run(tmp_path, optimizer, [plain_step])
    weights, ratios = recorded(tmp_path)
    assert sorted(ratios) == sorted(reference)
    for step, (weight, ratio) in reference.items():
        np.testing.assert_allclose(weights[step], weight, rtol=1e-5, err_msg=f"step {step}")
        np.testing.assert_allclose(ratios[step], ratio, rtol=2e-3, atol=1e-7,
                                   err_msg=f"step {step}")
    # The copy of the weights is only written where the update is not known:
    # with the update tensors it still holds the weights it was made with.
    copies = copied_values(monitor._stats.snapshots, len(model.trainable_variables))
    last_copied = [v.numpy() for v in model.trainable_variables]
    held_initial = not np.allclose(copies[0], last_copied[0])
    assert held_initial == watched
    assert ("apply" in vars(optimizer)) is False  # close() restored it


@pytest.mark.parametrize("where", ["after", "before"])
def test_another_write_in_the_step_falls_back_to_the_copy(tmp_path, where):
    """Weights clipped in the step, after or before the update: the ratio includes the clip."""
    hook = {("after" if where == "after" else "before") + "_update": clip_weights}
    make = lambda m, o, mon: plain_step(m, o, mon, **hook)  # noqa: E731
    x, y = data(n=8 * BATCH)
    _, _, reference = run(tmp_path, keras.optimizers.SGD(0.1), [make], x=x * 5, y=y * 5)
    weights, ratios = recorded(tmp_path)
    grads = var_vectors(read_events(tmp_path), "grad_norm")
    # The clip changed the weights: the change is not SGD's 0.1 * |g| alone.
    assert any(not np.allclose(ratio * weight, 0.1 * grads[step], rtol=1e-3)
               for step, (weight, ratio) in reference.items())
    for step, (weight, ratio) in reference.items():
        np.testing.assert_allclose(weights[step], weight, rtol=1e-5, err_msg=f"step {step}")
        np.testing.assert_allclose(ratios[step], ratio, rtol=2e-3, err_msg=f"step {step}")


def test_a_step_without_a_fresh_copy_reports_no_ratio(tmp_path):
    """Two step functions, one whose update is known and one that needs the copy.

    The known one takes no copy, so the other, right after it, has none for
    its step: NaN rather than a ratio against older weights. After itself it
    has one again.
    """
    known = plain_step
    copied = lambda m, o, mon: plain_step(m, o, mon, after_update=clip_weights)  # noqa: E731
    # Steps 0..7 by known, known, copied, copied, known, copied, ...
    order = [known, known, copied, copied]
    _, _, reference = run(tmp_path, keras.optimizers.SGD(0.05), order)
    weights, ratios = recorded(tmp_path)
    stale = {2, 6}  # a copied step right after a known one
    assert sorted(ratios) == list(range(8))
    for step, (weight, ratio) in reference.items():
        if step in stale:
            assert np.isnan(ratios[step]).all(), step
            # The weight norm is that after the update, not that of old weights.
            assert np.isfinite(weights[step]).all()
        else:
            np.testing.assert_allclose(weights[step], weight, rtol=1e-5, err_msg=f"step {step}")
            np.testing.assert_allclose(ratios[step], ratio, rtol=2e-3, atol=1e-7,
                                       err_msg=f"step {step}")


def test_the_wrapped_apply_is_the_optimizers_own_after_close(tmp_path):
    optimizer = keras.optimizers.Adam(0.01)
    own = optimizer.apply
    monitor = StabilityMonitor(str(tmp_path), optimizer=optimizer)
    assert "apply" in vars(optimizer)
    monitor.close()
    assert "apply" not in vars(optimizer) and optimizer.apply == own
    # Not wrapped where the update may not be the optimizer's alone.
    scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01))
    with StabilityMonitor(str(tmp_path / "scaled"), optimizer=scaled):
        assert "apply" not in vars(scaled)
    with StabilityMonitor(str(tmp_path / "no-ratio"), optimizer=optimizer,
                          snapshot_weights=False):
        assert "apply" in vars(optimizer)  # the NaN capture copies the weights there
    with StabilityMonitor(str(tmp_path / "neither"), optimizer=optimizer,
                          snapshot_weights=False, nan_forensics=False):
        assert "apply" not in vars(optimizer)
