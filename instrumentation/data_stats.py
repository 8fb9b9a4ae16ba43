"""Inputs, labels and predictions: statistics of the training batch every N steps.

Captured inside the compiled train step from the arguments of
``model.compute_loss(x, y, y_pred, sample_weight)`` (the callback wraps it)
under a ``tf.cond`` on ``step % every == 0``; results go into non-trainable
variables that the host reads every N steps (XLA-safe).

* Inputs: every floating input tensor is flattened to ``[-1, F]`` over all
  but its last axis (tabular features, sequence features, image channels);
  per feature mean/std/min/max -> ``stability/inputs`` ``[4, F]`` with names
  ``x[0]``, ``x[1]``, ... (``<input name>[j]`` for several inputs).
* Labels / predictions (classification only): class counts of the batch.
  One output unit: 2 classes (threshold 0.5, or 0 on logits); several units:
  argmax; sparse integer labels: the integer class. Regression: skipped.
* Targets (no class counts: regression): the floating labels of the first
  output flattened like an input, per target mean/std/min/max ->
  ``stability/targets`` ``[4, T]`` with names ``y[0]``, ... (the loss of
  predicting their mean, for the base-rate rule).
* The label range (min, max) of the probe batch, and the most rows a probe
  batch had (its batch size: BatchNorm over one row is degenerate), for the
  configuration check.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
import tensorflow as tf

from instrumentation import readback
from instrumentation.graph_ops import rare_cond, ring_slot, unused_slot_steps

logger = logging.getLogger("instrumentation")

MAX_FEATURES = 4096  # larger inputs are summarised as one feature


class DataStats:
    """Graph-side capture and host-side read of batch statistics.

    Args:
      every: Record on steps with ``step % every == 0``.
      mode: ``"binary"``, ``"categorical"`` or None (regression: no counts).
      logits: Whether the model outputs logits (binary threshold 0, not 0.5).
    """

    def __init__(self, every: int, mode: Optional[str], logits: bool = False, slots: int = 2):
        self.every = max(1, int(every))
        self.slots = max(2, int(slots))
        self.mode = mode
        self.logits = bool(logits)
        self.names: tuple[str, ...] = ()
        self.classes = 0
        self.inputs = None
        self.targets = None
        self.target_names: tuple[str, ...] = ()
        self.labels = None
        self.predictions = None
        self.label_range = None
        self.batch_rows = None
        self.step = None
        self._last_step = -1

    # ----------------------------------------------------------------- graph

    def record(self, step, x, y, y_pred, always: bool = False) -> None:
        """Adds the capture ops for one traced train step (call while tracing).

        Args:
          always: Capture at every step of this trace, without a condition.
        """
        step = tf.cast(step, tf.int64)
        features = self._feature_matrices(x)
        y_t = first_tensor(y)
        p_t = first_tensor(y_pred)
        classes = self._classes(p_t)
        targets = self._target_matrix(y_t) if not classes else None
        self._ensure(sum(int(f.shape[1]) for _, f in features), classes,
                     int(targets.shape[1]) if targets is not None else 0)

        def capture():
            slot = ring_slot(step, self.every, self.slots)

            def put(variable, value):
                tf.raw_ops.ResourceScatterUpdate(resource=variable.handle, indices=slot,
                                                 updates=value)

            if features:
                put(self.inputs, tf.concat([_column_stats(f) for _, f in features], axis=1))
            if targets is not None:
                put(self.targets, _column_stats(targets))
            if self.classes and y_t is not None and p_t is not None:
                put(self.labels, self._label_counts(y_t, p_t))
                put(self.predictions, self._pred_counts(p_t))
            if y_t is not None and (y_t.dtype.is_floating or y_t.dtype.is_integer):
                yf = tf.cast(y_t, tf.float32)
                self.label_range.assign(tf.stack([tf.reduce_min(yf), tf.reduce_max(yf)]))
            rows = _batch_rows(x, y_t)
            if rows is not None:
                self.batch_rows.assign(tf.maximum(self.batch_rows, rows))
            put(self.step, step)
            return tf.constant(True)

        rare_cond(True if always else tf.equal(tf.math.floormod(step, self.every), 0), capture)

    def _feature_matrices(self, x) -> list:
        leaves = tf.nest.flatten(x)
        keys = _input_keys(x, len(leaves))  # by position among all inputs, integer ones too
        pairs = [(key, t) for key, t in zip(keys, leaves) if tf.is_tensor(t) and t.dtype.is_floating]
        keys, flat = [k for k, _ in pairs], [t for _, t in pairs]
        out, names = [], []
        for key, tensor in zip(keys, flat):
            matrix, columns = _columns(tensor, key)
            names.extend(columns)
            out.append((key, matrix))
        self.names = tuple(names)
        return out

    def _target_matrix(self, y_t):
        """A floating dense label tensor as ``[-1, T]`` (`_columns`, names ``y[j]``); None for
        labels that are not floating, not dense or of unknown rank."""
        self.target_names = ()
        if not isinstance(y_t, tf.Tensor) or not y_t.dtype.is_floating or y_t.shape.rank is None:
            return None
        matrix, columns = _columns(y_t, "y")
        self.target_names = tuple(columns)
        return matrix

    def _classes(self, p_t) -> int:
        if self.mode is None or p_t is None or p_t.shape.rank is None or p_t.shape.rank < 1:
            return 0
        units = p_t.shape[-1] if p_t.shape.rank > 1 else 1
        if units is None:
            return 0
        return 2 if int(units) == 1 else int(units)

    def _ensure(self, features: int, classes: int, targets: int = 0) -> None:
        with tf.init_scope():
            n = self.slots
            if self.inputs is None or tuple(self.inputs.shape) != (n, 4, features):
                self.inputs = tf.Variable(tf.zeros([n, 4, features]), trainable=False,
                                          name="stability_inputs")
            if targets and (self.targets is None or tuple(self.targets.shape) != (n, 4, targets)):
                self.targets = tf.Variable(tf.zeros([n, 4, targets]), trainable=False,
                                           name="stability_targets")
            elif not targets:
                self.targets = None
            if classes and (self.labels is None or tuple(self.labels.shape) != (n, classes)):
                self.labels = tf.Variable(tf.zeros([n, classes]), trainable=False,
                                          name="stability_labels")
                self.predictions = tf.Variable(tf.zeros([n, classes]), trainable=False,
                                               name="stability_predictions")
            if self.step is None or int(self.step.shape[0]) != n:
                self.step = tf.Variable(unused_slot_steps(n),
                                        trainable=False, name="stability_data_step")
                self.label_range = tf.Variable(tf.fill([2], np.nan), dtype=tf.float32,
                                               trainable=False, name="stability_label_range")
                self.batch_rows = tf.Variable(tf.constant(0, tf.int64), trainable=False,
                                              name="stability_batch_rows")
        self.classes = classes

    def _label_counts(self, y, p):
        c = self.classes
        if c == 2 and (p.shape.rank < 2 or p.shape[-1] == 1):
            hot = tf.one_hot(tf.cast(tf.reshape(tf.cast(y, tf.float32), [-1]) >= 0.5, tf.int32), 2)
        elif y.shape.rank == p.shape.rank and y.shape[-1] == c:
            hot = tf.one_hot(tf.argmax(tf.reshape(y, [-1, c]), axis=-1), c)
        else:
            hot = tf.one_hot(tf.cast(tf.reshape(y, [-1]), tf.int32), c)
        return tf.reduce_sum(hot, axis=0)

    def _pred_counts(self, p):
        c = self.classes
        if c == 2 and (p.shape.rank < 2 or p.shape[-1] == 1):
            threshold = 0.0 if self.logits else 0.5
            cls = tf.cast(tf.reshape(tf.cast(p, tf.float32), [-1]) >= threshold, tf.int32)
            return tf.reduce_sum(tf.one_hot(cls, 2), axis=0)
        return tf.reduce_sum(tf.one_hot(tf.argmax(tf.reshape(p, [-1, c]), axis=-1), c), axis=0)

    # ------------------------------------------------------------------ host

    def variables(self) -> list:
        """The variables `read` reads (for one batched read)."""
        return [v for v in (self.step, self.inputs, self.targets, self.label_range, self.labels,
                            self.predictions) if v is not None]

    def read(self, batch=None) -> list[dict]:
        """Every record since the last read, oldest first (``slots`` are kept).

        Args:
          batch: Optional `readback.BatchedRead` holding this read's values.

        Returns:
          A list of ``{"step", "inputs" ([4, F]), "names", "targets" ([4, T]),
          "target_names", "labels", "predictions", "label_range"}`` (counts
          None for regression, targets None for classification;
          ``label_range`` is that of the latest record).
        """
        if self.step is None:
            return []
        steps = readback.fetch(self.step, batch).astype(np.int64)
        fresh = [int(slot) for slot in np.argsort(steps, kind="stable")
                 if steps[slot] >= 0 and steps[slot] > self._last_step]
        if not fresh:
            return []
        self._last_step = int(steps[fresh[-1]])
        inputs = readback.fetch(self.inputs, batch) if self.names else None
        targets = readback.fetch(self.targets, batch) if self.targets is not None else None
        counts = self.classes and self.labels is not None
        labels = readback.fetch(self.labels, batch) if counts else None
        predictions = readback.fetch(self.predictions, batch) if counts else None
        label_range = [float(v) for v in readback.fetch(self.label_range, batch)]
        return [{"step": int(steps[slot]), "names": self.names,
                 "inputs": inputs[slot] if inputs is not None else None,
                 "targets": targets[slot] if targets is not None else None,
                 "target_names": self.target_names,
                 "labels": labels[slot] if counts else None,
                 "predictions": predictions[slot] if counts else None,
                 "label_range": label_range} for slot in fresh]


def _columns(tensor, key: str) -> tuple[tf.Tensor, list[str]]:
    """``tensor`` as float32 ``[-1, last axis]`` with names ``key[j]``; one column ``key[*]``
    where the last axis is unknown or wider than `MAX_FEATURES`."""
    tensor = tf.cast(tensor, tf.float32)
    last = tensor.shape[-1] if tensor.shape.rank and tensor.shape.rank > 1 else 1
    if last is None or last > MAX_FEATURES:
        return tf.reshape(tensor, [-1, 1]), [f"{key}[*]"]
    return tf.reshape(tensor, [-1, int(last)]), [f"{key}[{j}]" for j in range(int(last))]


def _column_stats(matrix) -> tf.Tensor:
    mean = tf.reduce_mean(matrix, axis=0)
    std = tf.sqrt(tf.maximum(tf.reduce_mean(tf.math.squared_difference(matrix, mean), axis=0), 0.0))
    return tf.stack([mean, std, tf.reduce_min(matrix, axis=0), tf.reduce_max(matrix, axis=0)])


def _batch_rows(x, y) -> Optional[tf.Tensor]:
    """The leading dimension of the first batched input (else of the labels), as int64."""
    for tensor in tf.nest.flatten(x) + ([y] if y is not None else []):
        if isinstance(tensor, tf.Tensor) and tensor.shape.rank:  # dense: not sparse or ragged
            return tf.cast(tf.shape(tensor)[0], tf.int64)
    return None


def first_tensor(structure) -> Any:
    """The first non-None leaf of ``structure`` as a tensor; None for None or no leaf."""
    if structure is None:
        return None
    flat = [t for t in tf.nest.flatten(structure) if t is not None]
    return tf.convert_to_tensor(flat[0]) if flat else None


def _input_keys(x, n: int) -> list[str]:
    """Names of the ``n`` flattened inputs: dict keys (sorted, as flattened), else ``x`` or ``x<i>``."""
    if isinstance(x, dict) and all(not isinstance(v, (dict, list, tuple)) for v in x.values()):
        return [str(k) for k in sorted(x)][:n] + [f"x{i}" for i in range(len(x), n)]
    if n == 1:
        return ["x"]
    return [f"x{i}" for i in range(n)]
