"""Graph helpers for the statistics ops added to the user's train step.

A ``tf.cond`` inside a ``tf.function`` is normally lowered to ``Switch``/``Merge``
ops: the executor then visits every op of the branch that is *not* taken, as a
dead tensor, on every step. The statistics add conds whose true branch runs
once every ``every`` steps and holds dozens to hundreds of ops (one per
variable or probe), so lowering would make the 99 idle steps pay for them.
`rare_cond` keeps the ``If`` op a function call instead: an idle step costs one
op, whatever the branch holds.
"""

from __future__ import annotations

from typing import Callable, Optional

import tensorflow as tf

_IF_TYPES = ("If", "StatelessIf")


def rare_cond(pred, true_fn: Callable[[], object],
              false_fn: Optional[Callable[[], object]] = None):
    """``tf.cond(pred, true_fn, false_fn)`` whose ``If`` op is not lowered.

    Args:
      pred: Scalar boolean tensor, or a Python bool when the answer is known
        while tracing: then the chosen branch is built inline, with no
        condition in the graph.
      true_fn: The branch taken when ``pred`` holds (returns a tensor).
      false_fn: The other branch; defaults to one returning ``False``.

    Returns:
      The cond's output.
    """
    if false_fn is None:
        false_fn = lambda: tf.constant(False)  # noqa: E731
    if isinstance(pred, bool):
        return true_fn() if pred else false_fn()
    if tf.executing_eagerly() or _several_replicas():
        # Under a multi-device strategy a function-call ``If`` would have to
        # sit on one device with every resource it touches (mirrored variables
        # live on each replica's device): the placer refuses. Lowered
        # Switch/Merge ops are placed one by one.
        return tf.cond(pred, true_fn, false_fn)
    graph = tf.compat.v1.get_default_graph()
    before = len(graph.get_operations())
    result = tf.cond(pred, true_fn, false_fn)
    for op in graph.get_operations()[before:]:
        if op.type in _IF_TYPES:
            # Same attribute `tf.cond` sets to True (cond_v2, control_flow_util_v2).
            op._set_attr("_lower_using_switch_merge",  # pylint: disable=protected-access
                         tf.compat.v1.AttrValue(b=False))
    return result


def ring_slot(step, every: int, slots: int):
    """The device-side slot of log step ``step``: ``(step // every) % slots`` (graph side)."""
    return tf.math.floormod(tf.math.floordiv(step, every), slots)


def unused_slot_steps(slots: int) -> tf.Tensor:
    """int64 ``[slots]`` of -1: the step of every slot of a ring, none recorded yet."""
    return tf.fill([int(slots)], tf.constant(-1, tf.int64))


def _several_replicas() -> bool:
    strategy = tf.distribute.get_strategy()
    return int(getattr(strategy, "num_replicas_in_sync", 1) or 1) > 1
