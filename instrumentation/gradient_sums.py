"""The gradients' squared norms and non-finite count, computable before the update.

`StepStats.local_stats` builds its per-step row from these. `StabilityMonitor`
computes them inside the optimizer's ``apply`` (before the update, where the
NaN capture must copy the weights) and hands them to ``observe``, which runs
after the update on the same gradient tensors: the step pays for them once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import tensorflow as tf

from instrumentation.graph_ops import rare_cond
from instrumentation.graph_values import count_nonfinite, half_sum_squares


@dataclasses.dataclass
class GradientSums:
    """Half squared norms of one step's gradients and their non-finite count (`gradient_sums`).

    Attributes:
      grads: The gradients they were computed from (None kept).
      halves: float32 ``sum(g**2) / 2`` per gradient, None where the gradient is None.
      total: float64 squared global norm (all gradients, unscaled).
      nonfinite: float64 number of non-finite gradient values (0 on a healthy step).
    """

    grads: list
    halves: list
    total: tf.Tensor
    nonfinite: tf.Tensor

    def of(self, grads: Sequence[Any]) -> bool:
        """Whether these sums were computed from exactly ``grads`` (the same tensors)."""
        grads = list(grads)
        return len(grads) == len(self.grads) and all(a is b for a, b in zip(grads, self.grads))


def gradient_sums(grads: Sequence[Any], xla: bool = False, loss: Any = None,
                  on_nonfinite: Optional[Callable[[Any, Any], None]] = None) -> GradientSums:
    """`GradientSums` of ``grads`` (graph side): one fused ``L2Loss`` each and one ``AddN``.

    A healthy step pays one finiteness test of ``|g|^2`` (``+ loss`` where
    ``loss``, a float64 scalar, is given); only when it fails does a
    `rare_cond` count the non-finite values and call ``on_nonfinite(count,
    loss)``.
    """
    grads = list(grads)
    halves = [None if g is None else half_sum_squares(g, xla=xla) for g in grads]
    present = [h for h in halves if h is not None]
    total = (tf.cast(tf.constant(2.0, tf.float32) * tf.add_n(present), tf.float64) if present
             else tf.constant(0.0, tf.float64))
    tested = total if loss is None else total + loss

    def count():
        found = tf.add_n([count_nonfinite(g) for g in grads if g is not None]
                         + [tf.constant(0.0, tf.float64)])
        if on_nonfinite is not None:
            on_nonfinite(found, loss)
        return found

    # The cond holds no collective (see `instrumentation.distribute`).
    nonfinite = rare_cond(tf.logical_not(tf.math.is_finite(tested)), count,
                          lambda: tf.constant(0.0, tf.float64))
    return GradientSums(grads=grads, halves=halves, total=total, nonfinite=nonfinite)
