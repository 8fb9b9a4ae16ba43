"""The optimizer's own update tensors, for ``|Δw|`` without a second pass over the weights.

Keras' built-in optimizers end their ``update_step`` with one
``self.assign_sub(variable, delta)`` (or ``assign_add``): ``delta`` is the
update itself, already computed. `UpdateCapture` wraps those two methods for
the duration of one traced ``optimizer.apply`` and keeps each tracked
variable's ``delta``; its norm then costs one fused ``L2Loss``, where
``after - before`` costs a subtraction over the weights and makes the update
copy them (the pre-update values are still held: copy-on-write).

A captured ``delta`` is used only when it provably is the whole change: it was
the one write to the variable among every op the traced ``apply`` created
(no weight decay written on the side, no constraint projection, no
conditional or nested write), dense, and in the step's own graph. Anything
else falls back to ``after - before`` for that variable, so a wrong guess
costs time, never correctness. The reported change is the update as applied
by the optimizer, before rounding to the weights' precision.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Optional, Sequence

import tensorflow as tf

from instrumentation.graph_values import current_graph, tf_variable
from instrumentation.instance_patches import InstancePatches

# Ops that take a variable's handle without writing to it.
_READ_ONLY = frozenset({"ReadVariableOp", "VariableShape", "ResourceGather", "ResourceGatherNd",
                        "VarIsInitializedOp", "DestroyResourceOp"})


def expected(optimizer: Any, replicas: int) -> bool:
    """Whether ``optimizer`` is expected to write each variable once through its own methods.

    Only a prediction (the capture verifies every variable itself): a Keras
    built-in optimizer, without loss scaling, gradient accumulation or a
    moving average, on one replica. The callback uses it to decide, before the
    update is traced, whether the NaN capture may read the weights (the update
    then waits for it) rather than the pre-update values (which would make the
    update copy the weights); `StabilityMonitor`, whether to wrap ``apply``
    (`ApplyWatch`).
    """
    module = type(optimizer).__module__ or ""
    return (
        replicas <= 1
        and module.startswith("keras.")
        and not hasattr(optimizer, "inner_optimizer")
        and not getattr(optimizer, "gradient_accumulation_steps", None)
        and not getattr(optimizer, "use_ema", False)
        and callable(getattr(optimizer, "assign_sub", None))
    )


class UpdateCapture:
    """Records the update tensors one traced ``apply`` passes to the optimizer.

    Args:
      lookup: Maps a variable (Keras or TF) to a hashable key (its index among
        the tracked variables, say), or None for a variable not tracked. The
        tracked variables are looked up the same way by `changes`.
    """

    def __init__(self, lookup, reads: Sequence[Any] = ()):
        self._lookup = lookup
        self._writes: dict = {}  # key -> [(value, graph, sign)] of each captured write
        self._graph = None
        self._first_op = 0
        self._reads = {id(op) for op in reads}  # ops known to only read the variables

    @contextlib.contextmanager
    def watch(self, optimizer: Any, whole_graph: bool = False):
        """Wraps ``optimizer.assign_add``/``assign_sub`` while the ``apply`` is traced.

        Args:
          optimizer: The optimizer whose ``apply`` is traced inside the block.
          whole_graph: Verify that no op of the whole graph but the captured
            one writes the variable, rather than no op created from the start
            of the block on (writes made before the ``apply`` count too).
        """
        patches = InstancePatches()
        try:
            self._graph = current_graph()
            self._first_op = 0 if whole_graph else len(self._graph.get_operations())
            for name, sign in (("assign_add", 1.0), ("assign_sub", -1.0)):
                patches.set(optimizer, name, self._wrap(getattr(optimizer, name), sign))
        except Exception:  # noqa: BLE001 - no capture: |Δw| falls back to after - before
            self._graph = None
        try:
            yield self
        finally:
            patches.restore()

    def _wrap(self, original, sign: float):
        def method(variable, value):
            try:
                key = self._lookup(variable)
                if key is not None:
                    self._writes.setdefault(key, []).append((value, current_graph(), sign))
            except Exception:  # noqa: BLE001 - an unknown variable: not captured
                pass
            return original(variable, value)

        return method

    def changes(self, variables: Sequence[Any]) -> list[Optional[tuple]]:
        """Per tracked variable, ``(update, sign)`` with ``w_after = w_before + sign * update``.

        None for a variable whose update is not verified to be its whole
        change (see the module docstring). Call after the wrapped ``apply``
        returned, in the same graph.
        """
        out: list = [None] * len(variables)
        graph = self._graph
        if graph is None or graph is not current_graph():
            return out
        writers = _writers_by_handle([op for op in graph.get_operations()[self._first_op:]
                                      if id(op) not in self._reads])
        handles = _internal_handles(graph)
        for index, variable in enumerate(variables):
            writes = self._writes.get(self._lookup(variable), [])
            if len(writes) != 1:
                continue
            value, where, sign = writes[0]
            if where is not graph or value is None or isinstance(value, tf.IndexedSlices):
                continue
            handle = handles.get(id(getattr(tf_variable(variable), "handle", None)))
            if handle is None or writers.get(id(handle), 0) != 1:
                continue
            try:
                out[index] = (tf.convert_to_tensor(value), sign)
            except (TypeError, ValueError):
                continue
        return out


def _internal_handles(graph) -> dict:
    """id(external handle) -> the graph's placeholder for it (captured variables)."""
    return {id(external): internal for external, internal in getattr(graph, "captures", ())}


def _writers_by_handle(ops) -> dict:
    """id(resource tensor) -> number of ops among ``ops`` that may write to it."""
    counts: dict = {}
    for op in ops:
        if op.type in _READ_ONLY:
            continue
        for tensor in op.inputs:
            if tensor.dtype == tf.resource:
                counts[id(tensor)] = counts.get(id(tensor), 0) + 1
    return counts


class ApplyWatch:
    """Captures the updates of every traced ``optimizer.apply``, for code traced after it.

    `StabilityMonitor`'s ``observe`` runs after the user's ``apply_gradients``
    in the same traced step. `attach` wraps the optimizer instance's ``apply``
    so that each traced call runs under an `UpdateCapture` (verified against
    the whole graph: a write to a weight anywhere else in the step, a second
    ``apply`` included, leaves that weight's update unknown); `changes`
    returns the last capture of this thread's current graph. Eager calls are
    not captured.

    Args:
      optimizer: A Keras optimizer (see `expected`).
      before: Optional ``before(grads, variables)`` called in each
        ``apply``, traced or eager, before the update (the monitor's NaN
        capture copies the weights there). The ops it adds must only read the
        variables: they do not count as writes to them. It must not raise.
    """

    def __init__(self, optimizer: Any, before: Optional[Callable[[list, list], None]] = None):
        self._optimizer = optimizer
        self._before = before
        self._patches = InstancePatches()
        self._last: dict = {}  # tracing thread -> its last UpdateCapture

    def attach(self) -> None:
        """Wraps the instance's ``apply`` (see `detach`)."""
        original = self._optimizer.apply

        def apply(*args, **kwargs):
            if tf.executing_eagerly():
                self._call_before(args, kwargs)
                return original(*args, **kwargs)
            reads = self._call_before(args, kwargs)
            capture = UpdateCapture(_identity, reads)
            with capture.watch(self._optimizer, whole_graph=True):
                result = original(*args, **kwargs)
            self._last[threading.get_ident()] = capture
            return result

        self._patches.set(self._optimizer, "apply", apply)

    def _call_before(self, args, kwargs) -> list:
        """Calls ``before`` with the ``apply`` call's gradients and variables; the ops it added."""
        if self._before is None:
            return []
        grads = args[0] if args else kwargs.get("grads")
        variables = args[1] if len(args) > 1 else kwargs.get("trainable_variables")
        if variables is None:
            variables = getattr(self._optimizer, "_trainable_variables", None)
        if grads is None or variables is None:
            return []
        graph = current_graph()
        first = len(graph.get_operations())
        self._before(list(grads), list(variables))
        return graph.get_operations()[first:]

    def detach(self) -> None:
        """Restores the instance's own ``apply``."""
        self._patches.restore()
        self._last.clear()

    def changes(self, variables: Sequence[Any]) -> Optional[list]:
        """`UpdateCapture.changes` of the last ``apply`` traced in this graph, or None."""
        capture = self._last.get(threading.get_ident())
        return capture.changes(variables) if capture is not None else None


def _identity(variable: Any) -> int:
    return id(tf_variable(variable))
