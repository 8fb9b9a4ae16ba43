"""One device-to-host copy per read: every statistics variable in one flat vector.

The host side reads many small non-trainable variables (the per-step ring,
per-variable slots, probe and data statistics, the NaN-capture step). Reading
each with ``.numpy()`` costs one eager op dispatch and one device-to-host copy
per variable. `BatchedRead` instead traces, once per set of variables, a
``tf.function`` that concatenates them all (cast to float64, exact for the
int64 step counters up to 2**53) and reads the result with a single
``.numpy()``. Components look their variables up with `fetch`, which falls
back to ``variable.numpy()`` for a variable not in the batch (or when no
batch is active), so every reader also works on its own.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np
import tensorflow as tf

logger = logging.getLogger("instrumentation")


class BatchedRead:
    """Reads a set of variables with one device-to-host copy; see module docstring."""

    def __init__(self):
        self._key: Optional[tuple] = None
        self._fn = None
        self._layout: list = []
        self._values: dict = {}
        self.failed = False

    def refresh(self, variables: Sequence[Any]) -> None:
        """Reads ``variables`` (one copy); `fetch` then returns their values."""
        self._values = {}
        variables = [v for v in variables if v is not None]
        if not variables or self.failed:
            return
        key = tuple(id(v) for v in variables)
        try:
            if key != self._key:
                self._build(variables)
                self._key = key
            with tf.init_scope():
                flat = self._fn().numpy()
        except Exception:  # noqa: BLE001 - fall back to one read per variable
            logger.debug("batched read failed; reading variables one by one", exc_info=True)
            self.failed = True
            return
        offset = 0
        for variable, shape, size, dtype in self._layout:
            part = flat[offset:offset + size].reshape(shape)
            self._values[id(variable)] = part.astype(dtype, copy=False)
            offset += size

    def _build(self, variables: Sequence[Any]) -> None:
        layout = []
        for v in variables:
            shape = tuple(int(d) for d in v.shape)
            layout.append((v, shape, int(np.prod(shape, dtype=np.int64)),
                           tf.as_dtype(v.dtype).as_numpy_dtype))
        captured = list(variables)

        @tf.function(autograph=False, reduce_retracing=False)
        def read_all():
            parts = []
            for v in captured:
                value = tf.convert_to_tensor(v)
                if value.dtype != tf.float64:
                    value = tf.cast(value, tf.float64)
                parts.append(value if value.shape.rank == 1 else tf.reshape(value, [-1]))
            return tf.concat(parts, axis=0)

        with tf.init_scope():
            read_all.get_concrete_function()
        self._fn = read_all
        self._layout = layout

    def clear(self) -> None:
        """Forgets the values of the last `refresh` (later fetches read directly)."""
        self._values = {}

    def fetch(self, variable: Any) -> np.ndarray:
        """The value of ``variable`` from the last `refresh`, else read now."""
        value = self._values.get(id(variable))
        if value is not None:
            return value
        return np.asarray(variable.numpy())


def fetch(variable: Any, batch: Optional[BatchedRead]) -> np.ndarray:
    """``batch.fetch(variable)`` when a batch is given, else ``variable.numpy()``."""
    if batch is not None:
        return batch.fetch(variable)
    return np.asarray(variable.numpy())
