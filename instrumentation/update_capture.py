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
from typing import Any, Optional, Sequence

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
    update copy the weights).
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
      lookup: Maps a variable (Keras or TF) to its index among the tracked
        variables, or None.
    """

    def __init__(self, lookup):
        self._lookup = lookup
        self._writes: dict = {}  # index -> [(value, graph)] of each captured write
        self._graph = None
        self._first_op = 0

    @contextlib.contextmanager
    def watch(self, optimizer: Any):
        """Wraps ``optimizer.assign_add``/``assign_sub`` while the ``apply`` is traced."""
        patches = InstancePatches()
        try:
            self._graph = current_graph()
            self._first_op = len(self._graph.get_operations())
            for name in ("assign_add", "assign_sub"):  # |Δw| does not need the sign
                patches.set(optimizer, name, self._wrap(getattr(optimizer, name)))
        except Exception:  # noqa: BLE001 - no capture: |Δw| falls back to after - before
            self._graph = None
        try:
            yield self
        finally:
            patches.restore()

    def _wrap(self, original):
        def method(variable, value):
            try:
                index = self._lookup(variable)
                if index is not None:
                    self._writes.setdefault(index, []).append((value, current_graph()))
            except Exception:  # noqa: BLE001 - an unknown variable: not captured
                pass
            return original(variable, value)

        return method

    def deltas(self, variables: Sequence[Any]) -> list[Optional[tf.Tensor]]:
        """Per tracked variable, its verified update tensor (up to sign), or None.

        Call after the wrapped ``apply`` returned, in the same graph.
        """
        out: list = [None] * len(variables)
        graph = self._graph
        if graph is None or graph is not current_graph():
            return out
        writers = _writers_by_handle(graph.get_operations()[self._first_op:])
        handles = _internal_handles(graph)
        for index, variable in enumerate(variables):
            writes = self._writes.get(index, [])
            if len(writes) != 1:
                continue
            value, where = writes[0]
            if where is not graph or value is None or isinstance(value, tf.IndexedSlices):
                continue
            handle = handles.get(id(getattr(tf_variable(variable), "handle", None)))
            if handle is None or writers.get(id(handle), 0) != 1:
                continue
            try:
                out[index] = tf.convert_to_tensor(value)
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
