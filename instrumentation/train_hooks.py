"""The graph- and host-side wrappers `StabilityCallback` installs for one fit.

* `make_apply` wraps ``optimizer.apply``: the per-step row, the NaN capture
  and the weight snapshot before the update, the per-variable record after.
* `make_loss_hook` wraps ``optimizer.scale_loss`` and ``model.compute_loss``
  to keep the raw loss tensor of the trace (Keras' logged loss is a running
  mean); `captured_loss` hands it to the wrapped ``apply``.
* `make_train_step` wraps ``model.train_step``: a custom train step that
  computes its loss itself gets it from its returned logs (`fill_loss`).
* `make_train_function` is the ``model.train_function`` the host calls: it
  picks the log-step or lean train function, reads the statistics every
  `read_interval` steps and flushes on errors and on time.
* `make_fit_guard` wraps ``model.fit`` (a previous fit that raised outside the
  train step is finished first).

Each takes the callback whose state it reads and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any, Optional

import tensorflow as tf

from instrumentation import distribute
from instrumentation import flush_policy
from instrumentation import optimizer_step
from instrumentation import update_capture
from instrumentation.graph_values import current_graph

_NORMAL_END = (StopIteration, tf.errors.OutOfRangeError)
MIN_READ_STEPS = 32


NO_APPLY = ("the train step never calls model.optimizer.apply (it updates the weights with "
            "optimizers of its own, e.g. a GAN's); use instrumentation.StabilityMonitor inside "
            "train_step instead")


@dataclasses.dataclass
class TraceState:
    """What the hooks learn while one fit's train step is traced (new for each fit).

    Attributes:
      loss: The loss tensor ``compute_loss``/``scale_loss`` gave in ``loss_graph``.
      loss_graph: The graph (trace) of ``loss``.
      pending_row: ``(step, graph)`` of a row whose loss ``train_step``'s logs give.
      applied_graph: The trace in which ``optimizer.apply`` last ran.
      applied_step: The 0-based step (before the update) that apply recorded
        in ``applied_graph``.
      loss_source: ``"compute_loss"`` (the hooks), ``"train_step"`` (its
        returned logs) or ``"none"`` (not recorded).
      not_recorded: Why nothing at all is recorded, once a trace found out.
    """

    loss: Any = None
    loss_graph: Any = None
    pending_row: Optional[tuple] = None
    applied_graph: Any = None
    applied_step: Any = None
    loss_source: str = "compute_loss"
    not_recorded: Optional[str] = None

    def run_info(self) -> dict:
        """The ``run_info`` entries that say where the loss came from."""
        info = {"loss_source": self.loss_source}
        if self.not_recorded:
            info["not_recorded"] = self.not_recorded
        return info


def read_interval(every: int) -> int:
    """Steps between two host reads: ``every``, or its first multiple >= `MIN_READ_STEPS`.

    Each read costs about a millisecond of host time (one batched
    device-to-host copy, one summary write); with a small ``every`` the
    records of several log steps wait in device-side slots instead.
    """
    every = max(1, int(every))
    return every * -(-MIN_READ_STEPS // every)


def make_apply(callback, optimizer, original):
    """The wrapped ``optimizer.apply``: the step's statistics before and after the update."""

    def apply(grads, trainable_variables=None):
        if not callback._active or callback._broken:
            return original(grads, trainable_variables)
        try:
            grads = list(grads)
            variables = (
                list(trainable_variables)
                if trainable_variables is not None
                else list(getattr(optimizer, "_trainable_variables", []) or []) or None
            )
            stats = callback._ensure_stats(variables)
            stats.log_mode = callback._trace_mode
            stats.xla = bool(getattr(callback.model, "jit_compile", False))
            loss = captured_loss(callback)
            # A log step reads the pre-update weights first. |Δw| comes from
            # the optimizer's own update tensors where they are expected to be
            # the whole change (`update_capture`); then those values must not
            # outlive the update (it would copy the weights), so the NaN
            # capture reads the weights and the update waits for its test.
            # Otherwise |Δw| needs them after the update anyway, and the
            # capture copies them instead: the update need not wait.
            early = stats.log_mode == "always" and stats.measure_update
            if early:
                stats.snapshot_when(True)
            deltas_expected = early and update_capture.expected(
                optimizer, distribute.num_replicas(
                    getattr(callback.model, "distribute_strategy", None)))
            # The NaN capture, inside the statistics' own non-finite branch.
            hook = callback._extras.nonfinite_hook(
                optimizer, variables,
                sources_for=stats.snapshots_of if early and not deltas_expected else None)
            state, skipped = optimizer_step.record_step(stats, optimizer, grads, variables,
                                                        loss=loss, on_nonfinite=hook)
            callback._trace.applied_graph = current_graph()
            callback._trace.applied_step = state.step
            if loss is None:  # fill_loss completes the row after train_step returns
                callback._trace.pending_row = (state.step, current_graph())
            if not early:
                stats.snapshot(state)
        except Exception as error:  # noqa: BLE001
            callback._fail(error)
            return original(grads, trainable_variables)
        if hook is None:  # loss scaling: the capture counts skips at every step
            callback._extras.before_update(optimizer, grads, variables,
                                           state.local_nonfinite)
        capture = update_capture.UpdateCapture(stats.index_of) if early else None
        with capture.watch(optimizer) if capture is not None else contextlib.nullcontext():
            result = original(grads, trainable_variables)
        try:
            if skipped is not None:  # a skipped step does not advance iterations
                stats.skips.assign(skipped)
            changes = capture.changes(stats.variables) if capture is not None else None
            stats.record_update(state, changes)
        except Exception as error:  # noqa: BLE001
            callback._fail(error)
        return result

    return apply


def make_loss_hook(callback, original, scale: bool):
    """Wraps ``scale_loss``/``compute_loss`` to keep this trace's raw loss tensor."""

    def hook(*args, **kwargs):
        result = original(*args, **kwargs)
        if not callback._active or callback._broken or kwargs.get("training") is False:
            return result
        loss = args[0] if scale else result
        if loss is None:
            return result
        try:
            callback._ensure_stats()
            # Kept as a tensor of this graph (no variable, no extra op): the
            # wrapped apply of the same trace reads it.
            callback._trace.loss = loss
            callback._trace.loss_graph = current_graph()
        except Exception as error:  # noqa: BLE001
            callback._fail(error)
        return result

    return hook


def captured_loss(callback):
    """The loss tensor compute_loss/scale_loss produced in this trace, or None.

    None (a train step that computes its loss itself): the row's loss is
    filled in from what ``train_step`` returns, or left out (`fill_loss`).
    """
    trace = callback._trace
    captured = trace.loss_graph is not None and trace.loss_graph is current_graph()
    loss, trace.loss, trace.loss_graph = trace.loss, None, None
    return loss if captured else None


def make_train_step(callback, original):
    """Wraps ``model.train_step``: after it returns, the loss where no hook saw it."""

    def train_step(*args, **kwargs):
        callback._trace.pending_row = callback._trace.applied_graph = None
        logs = original(*args, **kwargs)
        if callback._active and not callback._broken:
            try:
                fill_loss(callback, logs)
            except Exception as error:  # noqa: BLE001
                callback._fail(error)
        return logs

    return train_step


def fill_loss(callback, logs) -> None:
    """Completes this trace's row once ``train_step`` has returned its logs.

    A custom ``train_step`` that computes its loss without ``compute_loss`` or
    ``scale_loss`` leaves the row's loss unknown. Its returned ``"loss"`` is
    written into the row when it is this step's own value (it depends on the
    batch); a metric's running mean (it reads only variables) would hide every
    spike, so the loss column is then left out of the log. A train step that
    never calls ``model.optimizer.apply`` (its own optimizers) records nothing.
    """
    graph = current_graph()
    trace = callback._trace
    pending, trace.pending_row = trace.pending_row, None
    if trace.applied_graph is not graph:
        callback._warn_once("no_apply", f"tb-stability: no statistics are recorded: {NO_APPLY}")
        trace.loss_source, trace.not_recorded = "none", NO_APPLY
        return
    if pending is None or pending[1] is not graph:
        return  # compute_loss or scale_loss gave the loss
    loss = logs.get("loss") if isinstance(logs, dict) else None
    if (tf.is_tensor(loss) and loss.dtype.is_floating and not distribute.replica_context()
            and depends_on_batch(loss)):
        callback._stats.write_loss(pending[0], loss)
        trace.loss_source = "train_step"
        return
    trace.loss_source = "none"
    if callback._drainer is not None:
        callback._drainer.omit_loss = True
    callback._warn_once(
        "loss",
        "tb-stability: the train step computes its loss without model.compute_loss or "
        "optimizer.scale_loss and returns no per-step 'loss' (a metric's running mean "
        "hides spikes), so the per-step loss is not recorded; call "
        "self.compute_loss(x, y, y_pred) in train_step, or return the step's own loss as "
        "'loss'")


_DATA_OPS = frozenset({"IteratorGetNext", "IteratorGetNextSync", "OptionalGetValue"})


def depends_on_batch(tensor, limit: int = 2000) -> bool:
    """Whether ``tensor`` is computed from the step's data, not only from variables.

    Walks the data inputs (not control inputs) of its graph: the batch enters
    a train step as a non-resource placeholder (a function argument) or an
    iterator op; a metric's ``result()`` reads only variables (resource
    placeholders) and constants. Unknown (the walk hit ``limit``) counts as
    depending on the batch.
    """
    seen, stack = set(), [tensor.op]
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        if len(seen) > limit:
            return True
        if op.type in _DATA_OPS:
            return True
        if op.type == "Placeholder" and op.outputs[0].dtype != tf.resource:
            return True
        stack.extend(t.op for t in op.inputs)
    return False


def make_train_function(callback, functions: dict):
    """The ``model.train_function`` the callback installs: picks a function, reads, flushes."""
    split = len(functions) == 2
    single_mode, single = next(iter(functions.items()))

    def train_function(iterator):
        if split:
            mode = "always" if callback._next_step % callback.every == 0 else "never"
        else:
            mode = single_mode
        original = functions[mode] if split else single
        callback._trace_mode = mode  # read only while a function is traced
        try:
            logs = original(iterator)
        except _NORMAL_END:
            raise
        except BaseException:
            if callback._active:
                callback._guard(callback._finish)
            raise
        callback._next_step += callback._spe
        if callback._active and not callback._broken:
            callback._since_read += callback._spe
            if callback._since_read >= callback._read_interval:
                callback._since_read = 0
                callback._guard(callback._drain, True)  # writes on the worker thread
            flush_policy.after_train_call(callback)  # time-based flush (crash safety)
        return logs

    return train_function


def make_fit_guard(callback, original):
    """Wraps ``model.fit`` to finish a previous fit that never reached ``on_train_end``."""

    def fit(*args, **kwargs):
        # Only reached when a previous fit raised outside the train step
        # (e.g. in another callback) and never called on_train_end.
        if callback._active:
            callback._guard(callback._finish)
        return original(*args, **kwargs)

    return fit
