"""Per-variable weight norm and update ratio of one step, from what the step has at hand.

`StepStats.record_update` picks one of three sources for the weights before
the update ``w_before``:

* `from_changes`: every variable's update tensor is known
  (`instrumentation.update_capture`), so ``w_before = w_after - sign * Δ``:
  no copy of the weights is needed at all;
* `from_before`: pre-update values held from earlier in the step or copied
  into snapshot variables (with the known updates used where there are some);
* `without_before`: none, so the ratio is NaN and the weight norm is the
  current one.

Each returns ``(weight_norm, update_ratio)``, float32 vectors over the
variables, with ``update_ratio = |Δw| / |w_before|`` (0 where ``|w_before|`` is 0).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import tensorflow as tf

from instrumentation.graph_values import half_sum_squares, norms_from_halves, read_value


def from_changes(changes: Sequence[tuple], variables: Sequence[Any], xla: bool = False):
    """Norms from ``(update, sign)`` pairs with ``w_after = w_before + sign * update``."""
    befores = []
    for (update, sign), variable in zip(changes, variables):
        change = tf.cast(update, tf.float32)
        after = tf.cast(read_value(variable), tf.float32)
        befores.append(after - change if sign > 0 else after + change)
    return from_before(befores, variables, changes, xla)


def from_before(befores: Sequence[Any], variables: Sequence[Any],
                changes: Optional[Sequence[Optional[tuple]]] = None, xla: bool = False):
    """Norms from the pre-update values ``befores`` (and ``(update, sign)`` pairs, where known)."""
    weight, delta = [], []
    for index, (value, variable) in enumerate(zip(befores, variables)):
        before = tf.cast(tf.convert_to_tensor(value), tf.float32)
        weight.append(half_sum_squares(before, xla=xla))
        known = changes[index] if changes is not None else None
        if known is not None:
            delta.append(half_sum_squares(known[0], xla=xla))
        else:
            after = tf.cast(read_value(variable), tf.float32)
            delta.append(half_sum_squares(after - before, xla=xla))
    return _ratio(weight, delta)


def without_before(variables: Sequence[Any], xla: bool = False):
    """The current weight norms and a NaN update ratio."""
    weight_norm = norms_from_halves([half_sum_squares(read_value(v), xla=xla) for v in variables])
    return weight_norm, tf.fill(tf.shape(weight_norm), tf.constant(np.nan, tf.float32))


def _ratio(weight_halves: list, delta_halves: list):
    weight_norm = norms_from_halves(weight_halves)
    return weight_norm, tf.math.divide_no_nan(norms_from_halves(delta_halves), weight_norm)
