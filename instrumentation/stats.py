"""Graph-side training statistics: state variables and record functions.

Everything here runs inside the user's compiled train step (``tf.function``,
with or without XLA). It only reads tensors and assigns to non-trainable
``tf.Variable`` s owned by a `StepStats`; it never creates summary ops or
Python side effects that depend on tensor values, so it is XLA-safe. The host
side (`instrumentation.writer`) reads the variables back every few steps.

State kept by `StepStats`:

* ``ring``: float64 ``[capacity, len(columns)]``; row ``step % capacity``
  holds ``(step, loss, grad_norm**2, nonfinite_grads, learning_rate)`` of one
  step (the host takes the square root: one op less per step), followed by the optional `EXTRA_COLUMNS` the `StepStats` was created
  with (clipping, loss scaling, replicas). Unused rows have ``step == -1``.
* ``var_stats``: float32 ``[slots, 3, num_vars]``; slot
  ``(step // every) % slots`` holds the per-variable gradient norm, weight
  norm and update ratio of log step ``step`` (``step % every == 0``), and
  ``var_steps[slot] == step``.
* the weights before the update on log steps (``|Δw|`` needs them): in a
  step traced as a log step (``"always"``) simply the values read before the
  update, held as tensors until it is done (TensorFlow's copy-on-write keeps
  them intact: no variable, no copy beyond the one the update makes);
  elsewhere (``"cond"``, custom loops) ``snapshots``, flat variables of at
  most 64 MiB per dtype (`instrumentation.weight_copies`), created on first
  such use, and where some steps skip them (`expect_snapshot_steps`) the step
  each was taken for. Where every weight's update is known
  (`instrumentation.update_capture`), none of these is needed:
  ``w_before = w_after - sign * update``.

How a traced step decides whether it is a log step (`StepStats.log_mode`, read
while tracing):

* ``"cond"``: in the graph, ``step % every == 0``, with the per-variable work
  under a `rare_cond` (custom loops, ``steps_per_execution > 1``);
* ``"always"``: every traced step is a log step, no condition at all (the
  train function the callback calls on log steps, or ``every=1``);
* ``"never"``: no per-variable work at all (the callback's train function for
  the other steps: the host picks which function to call).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from instrumentation import update_norms
from instrumentation.gradient_sums import GradientSums, gradient_sums
from instrumentation.graph_ops import rare_cond, ring_slot, unused_slot_steps
from instrumentation.graph_values import (
    current_graph,
    float64_scalar,
    plain_variable,
    read_value,
    variable_keys,
    variable_name,
)
from instrumentation.weight_copies import copied_tensors, weight_copies
from tb_stability import schema

NUM_COLUMNS = len(schema.STEP_COLUMNS)
ANY_STEP = -1
"""`StepStats.expect_snapshot_steps`: the snapshot holds the weights before any step's update."""
STALE_SNAPSHOT = -2
"""`StepStats.expect_snapshot_steps`: the snapshot holds the weights before no pending update."""
GRAD_NORM, WEIGHT_NORM, UPDATE_RATIO = range(3)

# Optional per-step columns appended after `schema.STEP_COLUMNS` (their names
# go into the steps block's metadata, so the reader picks them up):
#   clipped             1 when the pre-clip norm exceeded clipnorm/global_clipnorm
#   skipped             1 when a LossScaleOptimizer skipped the update
#   loss_scale          the loss scale the step's gradients were divided by
#   nonfinite_replicas  bit mask: bit r set when replica r had non-finite values
EXTRA_COLUMNS = ("clipped", "skipped", "loss_scale", "nonfinite_replicas")
LOG_MODES = ("cond", "always", "never")


@dataclasses.dataclass
class LocalStats:
    """Gradient statistics of one step (of one replica, or aggregated).

    Attributes:
      loss: float64 scalar, the recorded loss.
      sum_squares: float32 ``[num_vars]`` squared gradient norms.
      total: float64 scalar, squared global gradient norm (untracked variables
        included).
      nonfinite: float64 scalar, number of non-finite gradient values.
    """

    loss: tf.Tensor
    sum_squares: tf.Tensor
    total: tf.Tensor
    nonfinite: tf.Tensor


@dataclasses.dataclass
class GradientState:
    """Tensors computed before the update and needed after it.

    Attributes:
      step: int64 scalar, the 0-based global step.
      is_log: whether this step records per-variable statistics: a bool
        scalar tensor, or a Python bool when decided while tracing.
      sum_squares: float32 ``[num_vars]`` squared gradient norms (zeros for
        variables without a gradient this step).
      local_nonfinite: float64 scalar, this replica's non-finite gradient
        count (before any cross-replica aggregation), when known.
    """

    step: tf.Tensor
    is_log: tf.Tensor
    sum_squares: tf.Tensor
    local_nonfinite: Optional[tf.Tensor] = None


def scalar_loss(loss: Any) -> Any:
    """A step's loss as a float64 scalar (the mean of a per-example loss)."""
    loss = tf.convert_to_tensor(loss)
    if loss.shape.rank != 0:
        loss = tf.reduce_mean(loss)
    return tf.cast(loss, tf.float64)


class StepStats:
    """Non-trainable variables holding recent training statistics.

    Create it outside of (or on the first trace of) a ``tf.function``; its
    variables are created under ``tf.init_scope``.

    Args:
      variables: The tracked trainable variables (Keras or TF variables).
      every: Per-variable statistics are recorded on steps with
        ``step % every == 0``.
      capacity: Rows of the per-step ring buffer; the host must read it at
        least every ``capacity`` steps.
      snapshot: Whether to measure the update ratio, from the weights before
        the update (held as tensors in a log-step trace, otherwise copied into
        snapshot variables: one extra copy of the weights in memory).
    """

    def __init__(
        self,
        variables: Sequence[Any],
        every: int,
        capacity: int,
        snapshot: bool = True,
        extra_columns: Sequence[str] = (),
    ):
        unknown = [c for c in extra_columns if c not in EXTRA_COLUMNS]
        if unknown:
            raise ValueError(f"unknown step columns {unknown}")
        self.columns = tuple(schema.STEP_COLUMNS) + tuple(
            c for c in EXTRA_COLUMNS if c in extra_columns
        )
        self.variables = list(variables)
        self.names = tuple(variable_name(v) for v in self.variables)
        self.every = max(1, int(every))
        self.log_mode = "cond"
        self.xla = False  # whether the traced step is XLA-compiled (read while tracing)
        self.capacity = max(2, int(capacity))
        self.slots = self.capacity // self.every + 2
        self._index = {}
        for i, variable in enumerate(self.variables):
            for key in variable_keys(variable):
                self._index.setdefault(key, i)
        n = len(self.variables)
        with tf.init_scope():
            self.ring = plain_variable(self._empty_ring(), "stability_ring")
            self.var_stats = plain_variable(
                tf.zeros([self.slots, 3, n], tf.float32), "stability_var_stats"
            )
            self.skips = plain_variable(tf.constant(0, tf.int64), "stability_skips")
            self.var_steps = plain_variable(
                unused_slot_steps(self.slots), "stability_var_steps"
            )
        self.measure_update = bool(snapshot)
        self.snapshots: Optional[list] = None  # created by the first conditional snapshot
        self._snapshot_step = None  # see expect_snapshot_steps
        # Per tracing thread (a MirroredStrategy traces each replica in its own
        # thread, into one graph): (graph, pre-update values) of the log step.
        self._held: dict = {}

    def _empty_ring(self) -> np.ndarray:
        ring = np.zeros([self.capacity, len(self.columns)], np.float64)
        ring[:, 0] = -1.0
        return ring

    def reset(self) -> None:
        """Marks every row and slot unused (eager, host side)."""
        self.ring.assign(self._empty_ring())
        self.var_steps.assign(unused_slot_steps(self.slots))
        self.skips.assign(0)

    # ------------------------------------------------------------------ graph

    def local_stats(
        self, grads: Sequence[Any], variables: Optional[Sequence[Any]], loss: Any,
        grad_scale: Any = None, on_nonfinite: Optional[Callable[[Any, Any], None]] = None,
        sums: Optional["GradientSums"] = None,
    ) -> "LocalStats":
        """Squared gradient norms and non-finite count of the given gradients.

        One fused ``L2Loss`` op per gradient and one ``AddN`` for the total;
        the loss scale (if any) divides the squared norms, not the gradients.
        A healthy step then pays one finiteness test of ``loss + |g|^2``; only
        when it fails does a `rare_cond` count the non-finite values exactly
        and call ``on_nonfinite(count, loss)`` (e.g. the NaN capture).

        Args:
          loss: This step's loss (a tensor of this graph), or None where the
            step's loss is unknown: the row then holds NaN (to be filled in
            or left out by the host) and only the gradients are tested.
          on_nonfinite: Optional graph-side hook run inside that branch.
          sums: `gradient_sums` of these very ``grads`` computed earlier in
            the step (before the update): reused, so ``loss`` is not tested
            and ``on_nonfinite`` is not called (that test was the earlier one).
        """
        if variables is None:
            variables = self.variables
        known = loss is not None  # else not seen by the instrumentation: NaN, not tested
        loss = scalar_loss(loss) if known else tf.constant(np.nan, tf.float64)
        if sums is None:
            hook = on_nonfinite if known or on_nonfinite is None else (
                lambda count, _: on_nonfinite(count, loss))
            sums = gradient_sums(grads, self.xla, loss if known else None, hook)
        zero = tf.constant(0.0, tf.float32)
        per_var = [zero] * len(self.variables)
        for half, variable in zip(sums.halves, variables):
            index = self.index_of(variable) if half is not None else None
            if index is not None:
                per_var[index] = half
        factor = tf.constant(2.0, tf.float32)
        total = sums.total
        if grad_scale is not None:
            scale_squared = tf.square(tf.cast(grad_scale, tf.float32))
            factor = factor / scale_squared
            total = total / tf.cast(scale_squared, tf.float64)
        # Only built into the graph where something uses it (log steps, replicas, clipping).
        sum_squares = factor * tf.stack(per_var) if per_var else tf.zeros([0], tf.float32)
        return LocalStats(loss=loss, sum_squares=sum_squares, total=total,
                          nonfinite=sums.nonfinite)

    def write_row(
        self, step: Any, local: "LocalStats", learning_rate: Any, extras: Optional[dict] = None
    ) -> GradientState:
        """Writes the ring row of ``step`` from (possibly aggregated) statistics."""
        step = tf.cast(step, tf.int64)
        extras = dict(extras or {})
        values = [
            tf.cast(step, tf.float64),
            tf.cast(local.loss, tf.float64),
            tf.cast(local.total, tf.float64),  # squared: the host takes the root
            tf.cast(local.nonfinite, tf.float64),
            float64_scalar(learning_rate),
        ]
        for name in self.columns[len(values):]:
            value = extras.get(name, np.nan)
            values.append(float64_scalar(value))
        tf.raw_ops.ResourceScatterUpdate(resource=self.ring.handle, indices=self._row_of(step),
                                         updates=tf.stack(values))
        return GradientState(step=step, is_log=self._is_log(step), sum_squares=local.sum_squares)

    def write_loss(self, step: Any, loss: Any) -> None:
        """Sets the loss of ``step``'s row, written by `write_row` earlier in this trace."""
        index = tf.stack([self._row_of(tf.cast(step, tf.int64)),
                          tf.constant(self.columns.index("loss"), tf.int64)])
        tf.raw_ops.ResourceScatterNdUpdate(ref=self.ring.handle, indices=tf.reshape(index, [1, 2]),
                                           updates=tf.reshape(scalar_loss(loss), [1]))

    def _row_of(self, step) -> Any:
        return tf.math.floormod(step, self.capacity)

    def _is_log(self, step) -> Any:
        if self.log_mode == "always":
            return True
        if self.log_mode == "never":
            return False
        return tf.equal(tf.math.floormod(step, self.every), 0)

    def snapshot(self, state: GradientState) -> None:
        """Copies the weights on log steps (call before the update)."""
        self.snapshot_when(state.is_log)

    def snapshot_when(self, predicate: Any, valid_for: Any = None) -> None:
        """Keeps the current weights (before the update) where ``predicate`` holds.

        ``predicate`` may be a Python bool (no condition in the graph). When it
        is True inside a traced function the weights are only read, and the
        values are held as tensors until `record_update` of the same trace;
        otherwise they are copied into the snapshot variables.

        Args:
          valid_for: The step whose update the copy precedes, when snapshot
            steps are checked (`expect_snapshot_steps`); default: any step.
        """
        if not self.measure_update or predicate is False:
            return
        if predicate is True and not tf.executing_eagerly():
            self._held[threading.get_ident()] = (current_graph(),
                                                  [read_value(v) for v in self.variables])
            return
        snapshots = self._snapshot_variables()

        def copy():
            for snapshot in snapshots:
                snapshot.assign_from(self.variables)
            if self._snapshot_step is not None:
                self._snapshot_step.assign(
                    ANY_STEP if valid_for is None else tf.cast(valid_for, tf.int64))
            return tf.constant(True)

        rare_cond(predicate, copy)

    def _snapshot_variables(self) -> list:
        """The `WeightCopy`s of the conditional snapshots (created on first use)."""
        if self.snapshots is None:
            with tf.init_scope():
                self.snapshots = weight_copies(
                    self.variables,
                    lambda value, shape: plain_variable(value, "stability_snapshot", shape))
        return self.snapshots

    def _held_values(self, release: bool = False) -> Optional[list]:
        """The pre-update values `snapshot_when(True)` held in this trace and thread, or None.

        Args:
          release: Forget them (the last use, after the update).
        """
        key = threading.get_ident()
        graph, held = self._held.get(key, (None, None))
        if release:
            self._held.pop(key, None)
        return held if held and graph is current_graph() else None

    def snapshots_of(self, variables: Sequence[Any]) -> Optional[list]:
        """The pre-update values of ``variables`` held in this trace, or None.

        Tensors held by ``snapshot_when(True)`` in this trace; None where there
        are none (the snapshot variables would have to be read at every step).
        """
        before = self._held_values()
        if before is None:
            return None
        indices = [self.index_of(v) for v in variables]
        if any(i is None for i in indices):
            return None
        return [before[i] for i in indices]

    def record_update(self, state: GradientState,
                      changes: Optional[Sequence[Optional[tuple]]] = None) -> None:
        """On log steps stores gradient norm, weight norm and update ratio per variable.

        Call after the update; the weight norm is that of the weights before
        the update (the snapshot) and the update ratio is
        ``|w_after - w_before| / |w_before|`` (0 where ``|w_before| == 0``).

        Args:
          changes: Optional per-variable ``(update, sign)`` pairs known to be
            the whole change of this step (`UpdateCapture.changes`; None
            entries: not known). The norm of a known update replaces
            ``|w_after - w_before|``. Without pre-update values held in this
            trace, and with every variable's update known, the weights before
            the update are ``w_after - sign * update`` and no snapshot is read
            (`uses_changes`).
        """
        held = self._held_values(release=True)
        restored = held is None and self.uses_changes(changes)

        def compute():
            grad_norm = tf.sqrt(state.sum_squares)
            if held is not None:
                weight_norm, ratio = update_norms.from_before(held, self.variables, changes,
                                                              self.xla)
            elif restored:
                weight_norm, ratio = update_norms.from_changes(changes, self.variables, self.xla)
                if self._snapshot_step is not None:  # the snapshot was not kept up to date
                    self._snapshot_step.assign(STALE_SNAPSHOT)
            else:
                weight_norm, ratio = self._norms_from_snapshot(state.step, changes)
            stats = tf.stack([grad_norm, weight_norm, ratio])
            slot = ring_slot(state.step, self.every, self.slots)
            self.var_stats.scatter_nd_update(
                tf.reshape(slot, [1, 1]), tf.expand_dims(stats, 0)
            )
            self.var_steps.scatter_nd_update(
                tf.reshape(slot, [1, 1]), tf.reshape(state.step, [1])
            )
            return tf.constant(True)

        rare_cond(state.is_log, compute)

    def uses_changes(self, changes: Optional[Sequence[Optional[tuple]]]) -> bool:
        """Whether every tracked variable's update is in ``changes`` (`record_update`)."""
        return (changes is not None and len(changes) == len(self.variables)
                and all(change is not None for change in changes))

    def _norms_from_snapshot(self, step, changes):
        if self.snapshots is None:
            return update_norms.without_before(self.variables, self.xla)
        copied = copied_tensors(self.snapshots, len(self.variables))
        if self._snapshot_step is None:
            return update_norms.from_before(copied, self.variables, changes, self.xla)
        taken = self._snapshot_step.read_value()
        return rare_cond(
            tf.logical_or(tf.equal(taken, ANY_STEP), tf.equal(taken, step)),
            lambda: update_norms.from_before(copied, self.variables, changes, self.xla),
            lambda: update_norms.without_before(self.variables, self.xla))

    def expect_snapshot_steps(self) -> None:
        """Records which step each snapshot is for, and checks it before use.

        For callers whose snapshots are taken by one step for the next
        (``snapshot_when(..., valid_for=step + 1)``), some of whose traces
        skip them (`uses_changes`): a log step whose snapshot was not taken
        for it reports a NaN update ratio and its current weight norm rather
        than a ratio against older weights.
        """
        if self._snapshot_step is None:
            with tf.init_scope():
                self._snapshot_step = plain_variable(
                    tf.constant(ANY_STEP, tf.int64), "stability_snapshot_step")

    def index_of(self, variable: Any) -> Optional[int]:
        """Index of ``variable`` (Keras or TF) among the tracked variables, or None."""
        for key in variable_keys(variable):
            if key in self._index:
                return self._index[key]
        return None
