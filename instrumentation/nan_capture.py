"""Graph side of the NaN origin: copy the first non-finite step's batch and weights.

`NanCapture` lives inside the compiled train step. The callback's
``compute_loss`` hook hands over the traced batch ``(x, y, sample_weight)`` and
loss; its ``optimizer.apply`` hook (before the update) tests the step for
finiteness and, only on the *first* non-finite step, copies the batch and the
weights before the update into non-trainable variables. Under
`StabilityCallback` the test is the statistics' own (`nonfinite_hook`: the
copy sits inside the branch that runs only when ``loss + |g|^2`` is not
finite). A healthy step still pays for one thing: a branch that reads the
weights orders every update after the test, unless the step already holds the
pre-update values (``sources``). Elsewhere `on_apply` adds a reduction over the
gradients and a scalar test. Without XLA the batch variables have a dynamic
shape; under XLA (variables cannot change shape) they are padded buffers of a
fixed number of rows (the static batch size, else at most ``max_rows`` /
``max_bytes``) and a larger batch is truncated.

The host side (replaying the step, saving the artefacts) is
`instrumentation.nan_origin`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from instrumentation.graph_ops import rare_cond
from instrumentation.graph_values import dense_values
from instrumentation.weight_copies import copied_values, weight_copies


class NanCapture:
    """Device-side capture of the first non-finite step (see module docstring).

    Args:
      jit: Whether the train step is XLA-compiled (padded batch buffers).
      max_rows: Row cap of a padded buffer when the batch size is not static.
      max_bytes: Byte cap of a padded buffer (per tensor).
    """

    def __init__(self, jit: bool = False, max_rows: int = 256, max_bytes: int = 64 << 20):
        self.jit = bool(jit)
        self.max_rows = int(max_rows)
        self.max_bytes = int(max_bytes)
        self.step = None
        self.variables: list = []
        self.copies: list = []  # `WeightCopy`s: flat variables per dtype (<= 64 MiB each)
        self.buffers: list = []  # (part, index, variable, rows variable or None)
        self.structure: dict = {}
        self._pending = None
        self._graph = None
        # Set to the LossScaleOptimizer under dynamic loss scaling: a skipped
        # step (scaled gradients overflowed, loss finite) is then captured only
        # when the skips persist (`tb_stability.detectors.nonfinite`'s rule).
        self.loss_scale_optimizer = None
        self.skip_run = None
        # How the forensics re-run the step: "compute_loss" (Keras' train
        # step), or "train_step" where the loss never went through compute_loss.
        self.replay_with = "compute_loss"

    # ----------------------------------------------------------------- graph

    def record_batch(self, x, y, sample_weight, loss) -> None:
        """Remembers the traced batch and loss of the step being traced.

        Args:
          loss: The loss ``compute_loss`` gave, or None for a batch taken from
            the arguments of a ``train_step`` that computes its loss itself
            (its forensics then replay that ``train_step``: `replay_with`).
        """
        self._pending = (x, y, sample_weight, loss)
        self._graph = tf.compat.v1.get_default_graph()

    def on_apply(self, step, grads: Sequence[Any], variables: Sequence[Any],
                 nonfinite: Any = None) -> None:
        """Adds the finiteness test and the one-time capture (before the update).

        Args:
          nonfinite: Optional count of non-finite values in ``grads`` already
            computed by the caller; without it the gradients are summed here.
        """
        pending = self._take_pending()
        if pending is None:
            return
        x, y, sample_weight, loss = pending
        self._ensure(variables, x, y, sample_weight)
        if nonfinite is not None:
            grads_ok = tf.equal(nonfinite, 0.0)
        else:
            sums = [tf.reduce_sum(tf.cast(dense_values(g), tf.float32)) for g in grads
                    if g is not None]
            grads_ok = tf.math.is_finite(tf.add_n(sums) if sums else tf.constant(0.0))
        loss = tf.reduce_sum(tf.cast(loss, tf.float32)) if loss is not None else tf.constant(0.0)
        if self.loss_scale_optimizer is not None:
            from tb_stability.detectors.nonfinite import LOSS_SCALE_FLOOR, MAX_CONSECUTIVE_SKIPS

            run = tf.where(grads_ok, tf.constant(0, tf.int64), self.skip_run + 1)
            self.skip_run.assign(run)
            stuck = run >= MAX_CONSECUTIVE_SKIPS
            scale = getattr(self.loss_scale_optimizer, "dynamic_scale", None)
            if scale is not None:  # not built yet on the first trace: run length only
                stuck = tf.logical_or(stuck, tf.cast(scale, tf.float32) <= LOSS_SCALE_FLOOR)
            persistent = tf.logical_and(tf.logical_not(grads_ok), stuck)
            bad = tf.logical_or(tf.logical_not(tf.math.is_finite(loss)), persistent)
        else:
            bad = tf.logical_not(tf.logical_and(tf.math.is_finite(loss), grads_ok))
        capture = self._capture_fn(step, x, y, sample_weight)
        rare_cond(tf.logical_and(bad, self.step < 0), capture)

    def nonfinite_hook(self, step, variables: Sequence[Any],
                       sources: Optional[Sequence[Any]] = None):
        """The capture as a function to call where the step is already known to be non-finite.

        For the callback's statistics, which test ``loss + |g|^2`` for
        finiteness at every step anyway: the returned ``hook(count, loss)``
        runs only inside that rare branch, so a healthy step pays nothing for
        the capture. Returns None when there is nothing to capture in this
        trace, or under loss scaling (whose skip counting needs every step: use
        `on_apply`).

        Args:
          sources: Optional variables holding the pre-update values of
            ``variables`` (the statistics' weight snapshots of this step, one
            per variable). The capture then copies from them and never reads
            the weights themselves, so the optimizer's updates need not wait
            for the finiteness test (a branch reading the weights orders every
            update after it).
        """
        if self.loss_scale_optimizer is not None:
            return None
        pending = self._take_pending()
        if pending is None:
            return None
        x, y, sample_weight, _ = pending
        self._ensure(variables, x, y, sample_weight)
        capture = self._capture_fn(step, x, y, sample_weight, sources)

        def hook(count, loss):
            bad = tf.logical_or(count > 0, tf.logical_not(tf.math.is_finite(loss)))
            rare_cond(tf.logical_and(bad, self.step < 0), capture)

        return hook

    def _take_pending(self):
        pending = self._pending if self._graph is tf.compat.v1.get_default_graph() else None
        self._pending = None
        if pending is not None:
            self.replay_with = "compute_loss" if pending[3] is not None else "train_step"
        return pending

    def _capture_fn(self, step, x, y, sample_weight, sources=None):
        step = tf.cast(step, tf.int64)
        copy_weights = self.weight_copier(sources)
        copy_batch = self.batch_copier(x, y, sample_weight)

        def capture():
            copy_weights()
            copy_batch()
            self.step.assign(step)
            return tf.constant(True)

        return capture

    def weight_copier(self, sources=None) -> Callable[[], None]:
        """A function (graph side) copying ``sources`` (default: `variables`) into the copies."""
        sources = list(self.variables if sources is None else sources)
        if len(sources) != len(self.variables):
            raise ValueError(f"{len(sources)} weight sources for {len(self.variables)} variables")

        def copy():
            for copy in self.copies:
                copy.assign_from(sources)

        return copy

    def batch_copier(self, x, y, sample_weight) -> Callable[[], None]:
        """A function (graph side) copying the batch into its buffers (`ensure_batch` first)."""
        parts = {"x": tf.nest.flatten(x) if x is not None else [],
                 "y": tf.nest.flatten(y) if y is not None else [],
                 "sw": tf.nest.flatten(sample_weight) if sample_weight is not None else []}

        def copy():
            for part, index, buffer, rows in self.buffers:
                tensor = tf.convert_to_tensor(parts[part][index])
                if rows is None:
                    buffer.assign(tensor)
                else:
                    cap = int(buffer.shape[0])
                    take = tf.minimum(tf.shape(tensor)[0], cap)
                    piece = tensor[:take]
                    pad = [[0, cap - take]] + [[0, 0]] * (tensor.shape.rank - 1)
                    buffer.assign(tf.pad(piece, pad))
                    rows.assign(tf.cast(take, tf.int64))

        return copy

    def _ensure(self, variables, x, y, sample_weight) -> None:
        self.ensure_weights(variables)
        self.ensure_batch(x, y, sample_weight)

    def ensure_weights(self, variables) -> None:
        """Creates the step variable and the weight copies of ``variables`` (once)."""
        with tf.init_scope():
            if self.step is None:
                self.step = tf.Variable(tf.constant(-1, tf.int64), trainable=False,
                                        name="stability_nan_step")
            if self.skip_run is None and self.loss_scale_optimizer is not None:
                self.skip_run = tf.Variable(tf.constant(0, tf.int64), trainable=False,
                                            name="stability_nan_skip_run")
            if [id(v) for v in self.variables] != [id(v) for v in variables]:
                self.variables = list(variables)
                self.copies = weight_copies(self.variables, name="stability_nan_weights")

    def ensure_batch(self, x, y, sample_weight) -> None:
        """Creates the batch buffers for tensors shaped like ``x``, ``y``, ``sample_weight`` (once)."""
        with tf.init_scope():
            if self.buffers:
                return
            self.structure = {"x": _structure(x), "y": _structure(y),
                              "sw": _structure(sample_weight)}
            for part, value in (("x", x), ("y", y), ("sw", sample_weight)):
                if value is None:
                    continue
                for index, tensor in enumerate(tf.nest.flatten(value)):
                    if tensor is None or not tf.is_tensor(tensor):
                        continue
                    buffer, rows = self._buffer(tensor)
                    if buffer is not None:
                        self.buffers.append((part, index, buffer, rows))

    def _buffer(self, tensor):
        shape, dtype = tensor.shape, tensor.dtype
        if shape.rank is None or shape.rank == 0:
            return None, None
        if not self.jit:
            empty = tf.zeros([0] * shape.rank, dtype)
            return tf.Variable(empty, shape=tf.TensorShape([None] * shape.rank),
                               trainable=False, name="stability_nan_batch"), None
        rest = shape[1:]
        if not rest.is_fully_defined():
            return None, None
        row_bytes = max(1, int(np.prod(rest.as_list() or [1])) * dtype.size)
        cap = shape[0] if shape[0] is not None else min(self.max_rows, self.max_bytes // row_bytes)
        cap = max(1, int(cap))
        buffer = tf.Variable(tf.zeros([cap] + rest.as_list(), dtype), trainable=False,
                             name="stability_nan_batch")
        rows = tf.Variable(tf.constant(0, tf.int64), trainable=False, name="stability_nan_rows")
        return buffer, rows

    # ------------------------------------------------------------------ host

    def captured_step(self, batch=None) -> Optional[int]:
        """The captured step, or None (one scalar read, or from ``batch``)."""
        if self.step is None:
            return None
        from instrumentation import readback

        step = int(readback.fetch(self.step, batch))
        return step if step >= 0 else None

    def batch(self) -> dict:
        """``{"x": [...], "y": [...], "sw": [...]}`` numpy arrays of the captured batch."""
        out: dict = {"x": [], "y": [], "sw": []}
        for part, index, buffer, rows in self.buffers:
            value = buffer.numpy()
            if rows is not None:
                value = value[: int(rows.numpy())]
            out[part].append((index, value))
        return {k: [v for _, v in sorted(items, key=lambda item: item[0])] for k, items in out.items()}

    def weights(self) -> list:
        """The captured weights (before the update), aligned with `variables`."""
        return copied_values(self.copies, len(self.variables))

    def captured(self, step: int) -> "CapturedStep":
        """The captured step read back for the forensics (host side)."""
        from instrumentation.nan_origin import rebuild, variable_path

        batch = self.batch()
        return CapturedStep(
            batch=batch, x=rebuild(self.structure["x"], batch["x"]),
            y=rebuild(self.structure["y"], batch["y"]),
            sample_weight=rebuild(self.structure["sw"], batch["sw"]),
            weights=self.weights(), names=[variable_path(v) for v in self.variables],
            record={"step": int(step), "rows": int(len(batch["x"][0])) if batch["x"] else 0,
                    "structure": self.structure})


@dataclasses.dataclass
class CapturedStep:
    """A captured step on the host (`NanCapture.captured`).

    Attributes:
      batch: ``{"x", "y", "sw"}`` lists of arrays (as `save_artifacts` takes them).
      x, y, sample_weight: The batch rebuilt in its structures (None where absent).
      weights: The weights before the update, aligned with ``names``.
      names: The variables' paths.
      record: The origin record's first fields: ``step``, ``rows``, ``structure``.
    """

    batch: dict
    x: Any
    y: Any
    sample_weight: Any
    weights: list
    names: list
    record: dict


def _structure(value) -> dict:
    if value is None:
        return {"kind": "none"}
    if isinstance(value, dict):
        return {"kind": "dict", "keys": sorted(str(k) for k in value)}
    if isinstance(value, (list, tuple)):
        return {"kind": "list", "n": len(tf.nest.flatten(value))}
    return {"kind": "single"}
