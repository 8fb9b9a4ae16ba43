"""Graph side of one optimizer step under `StabilityCallback`: the row it records.

Separate from the Keras wiring in `instrumentation.callback`: which optional
step columns a model/optimizer needs, and `record_step`, called inside the
wrapped ``optimizer.apply`` with the pre-clip gradients.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from instrumentation import distribute
from instrumentation.stats import StepStats


def extra_columns(model, optimizer) -> tuple:
    """Optional step columns (`stats.EXTRA_COLUMNS`) this model/optimizer needs."""
    columns = []
    if distribute.clipping_configured(optimizer):
        columns.append("clipped")
    if is_loss_scale_optimizer(optimizer):
        columns += ["skipped", "loss_scale"]
    if distribute.num_replicas(getattr(model, "distribute_strategy", None)) > 1:
        columns.append("nonfinite_replicas")
    return tuple(columns)


def is_loss_scale_optimizer(optimizer) -> bool:
    return hasattr(optimizer, "inner_optimizer") and (
        hasattr(optimizer, "dynamic_scale") or type(optimizer).__name__ == "LossScaleOptimizer"
    )


def record_step(stats: StepStats, optimizer, grads, variables, loss, on_nonfinite=None):
    """Writes the row of one optimizer step (graph side, inside ``apply``).

    Gradients are taken pre-clip and unscaled (divided by the loss scale). Under
    a LossScaleOptimizer the step is ``iterations`` plus the skipped steps so
    far (a skipped update does not advance ``iterations``). Under a
    ``tf.distribute`` strategy the replicas' statistics are summed with one
    unconditional all-reduce (`distribute.reduce_local_stats`).

    Args:
      loss: This step's loss tensor.
      on_nonfinite: Optional hook for `StepStats.local_stats` (the NaN capture).

    Returns:
      ``(GradientState, skips)``; ``skips`` (the skipped steps including this
      one) is None without loss scaling.
    """
    if is_loss_scale_optimizer(optimizer) and not optimizer.built and variables:
        optimizer.build(variables)  # creates dynamic_scale (apply would do it next)
        optimizer.built = True
    scale = grad_scale(optimizer)
    local = stats.local_stats(grads, variables, loss, scale, on_nonfinite=on_nonfinite)
    local_before_reduce = local
    extras = {}
    clipped = distribute.clip_fired(optimizer, local) if "clipped" in stats.columns else None
    replica = distribute.replica_context()
    if replica is not None:
        local, reduced = distribute.reduce_local_stats(*replica, local, clipped)
        extras.update(reduced)
    elif clipped is not None:
        extras["clipped"] = clipped
    skipped = None
    step = tf.identity(distribute.micro_iterations(optimizer))  # micro-steps under accumulation
    if is_loss_scale_optimizer(optimizer):
        finite = tf.logical_and(tf.math.is_finite(local.total), tf.equal(local.nonfinite, 0.0))
        skipped = 1.0 - tf.cast(finite, tf.float64)
        extras["skipped"] = skipped
        extras["loss_scale"] = tf.identity(optimizer.dynamic_scale)
        skips = stats.skips.read_value()
        step = tf.cast(step, tf.int64) + skips
        skipped = skips + tf.cast(extras["skipped"], tf.int64)  # skips after this step
    local_nonfinite = local_before_reduce.nonfinite
    state = stats.write_row(step, local, optimizer.learning_rate, extras)
    state.local_nonfinite = local_nonfinite
    return state, skipped


def grad_scale(optimizer) -> Any:
    """The factor the incoming gradients are scaled by (loss scaling), or None."""
    if hasattr(optimizer, "inner_optimizer") and hasattr(optimizer, "dynamic_scale"):
        return optimizer.dynamic_scale
    return getattr(optimizer, "loss_scale_factor", None)
