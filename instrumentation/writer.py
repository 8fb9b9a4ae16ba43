"""Host-side writing: reads `StepStats` variables and writes the schema's summaries.

Runs eagerly, outside any compiled step (``tf.summary`` does not work under
XLA). The only module of `instrumentation` that writes event files; every tag
and metadata comes from `tb_stability.schema`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from typing import Any, Optional, Sequence

import numpy as np
import tensorflow as tf

from tensorflow.python.ops import gen_summary_ops  # WriteRawProtoSummary, no public wrapper

from tb_stability import schema

from instrumentation import readback
from instrumentation.stats import GRAD_NORM, UPDATE_RATIO, WEIGHT_NORM, StepStats

logger = logging.getLogger("instrumentation")


_DT = {np.dtype(np.float32): 1, np.dtype(np.float64): 2}  # tensorflow DataType enum


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_summary(tag: str, array: np.ndarray, metadata: bytes) -> bytes:
    """A serialized ``Summary`` holding one tensor value, as ``tf.summary.write`` builds it.

    The same fields as TensorFlow's ``WriteSummary`` kernel (``tag``, a
    ``TensorProto`` with ``dtype``, ``tensor_shape`` and ``tensor_content``,
    and the metadata), encoded directly: float32/float64 arrays only.
    """
    array = np.ascontiguousarray(array)
    shape = b"".join(_field(2, b"\x08" + _varint(int(d))) if d else _field(2, b"")
                     for d in array.shape)
    tensor = b"\x08" + _varint(_DT[array.dtype]) + _field(2, shape) + _field(4, array.tobytes())
    value = _field(1, tag.encode("utf-8")) + _field(8, tensor) + _field(9, metadata)
    return _field(1, value)


def _metadata(quantity: str, names: Sequence[str] = (), rows: Sequence[str] = ()) -> bytes:
    return schema.create_summary_metadata(quantity, names=names, rows=rows).SerializeToString()


class SummaryWriter:
    """Writes stability summaries into one run directory.

    The underlying ``tf.summary`` file writer is created on first use.

    Args:
      log_dir: The run directory.
    """

    def __init__(self, log_dir: str):
        self.log_dir = str(log_dir)
        self._writer = None
        self._metadata_cache: dict = {}
        self._pending: Optional[list] = None

    @contextlib.contextmanager
    def batch(self):
        """Collects the tensor summaries written inside and writes them in one op per step."""
        if self._pending is not None:  # nested: the outer batch writes
            yield self
            return
        self._pending = []
        try:
            yield self
        finally:
            pending, self._pending = self._pending, None
            self._write_raw(pending)

    def _emit(self, tag: str, array: np.ndarray, step: int, metadata: bytes) -> None:
        record = (int(step), encode_summary(tag, array, metadata))
        if self._pending is not None:
            self._pending.append(record)
        else:
            self._write_raw([record])

    def _write_raw(self, records: list) -> None:
        """Writes ``(step, serialized Summary)`` records: one op per run of equal steps."""
        if not records:
            return
        with tf.init_scope():
            writer = self.writer
            resource = getattr(writer, "_resource", None)
            start = 0
            for index in range(1, len(records) + 1):
                if index == len(records) or records[index][0] != records[start][0]:
                    protos = tf.constant([r[1] for r in records[start:index]], tf.string)
                    step = records[start][0]
                    if resource is not None:  # the op itself, without write_raw_pb's conds
                        gen_summary_ops.write_raw_proto_summary(resource, step, protos)
                    else:
                        with writer.as_default():
                            tf.summary.experimental.write_raw_pb(protos, step=step)
                    start = index

    @property
    def writer(self):
        """The lazily created ``tf.summary`` file writer."""
        if self._writer is None:
            with tf.init_scope():
                from instrumentation.flush_policy import FLUSH_MILLIS

                self._writer = tf.summary.create_file_writer(self.log_dir,
                                                             flush_millis=FLUSH_MILLIS)
        return self._writer

    def _meta(self, quantity: str, names: Sequence[str] = ()) -> bytes:
        key = (quantity, tuple(names))
        if key not in self._metadata_cache:
            self._metadata_cache[key] = _metadata(quantity, names)
        return self._metadata_cache[key]

    def write_steps(self, rows: np.ndarray, columns: Sequence[str] = schema.STEP_COLUMNS) -> None:
        """Writes a block of consecutive per-step rows ``[k, len(columns)]``."""
        rows = np.asarray(rows, np.float64)
        if rows.size == 0:
            return
        self._emit(schema.TAG_STEPS, rows, int(rows[-1, 0]), self._meta("steps", columns))

    def write_variables(self, step: int, stats: np.ndarray, names: Sequence[str]) -> None:
        """Writes ``stats[GRAD_NORM|WEIGHT_NORM|UPDATE_RATIO]`` vectors for one step."""
        names = tuple(names)
        for quantity, row in (
            ("grad_norm", GRAD_NORM),
            ("weight_norm", WEIGHT_NORM),
            ("update_ratio", UPDATE_RATIO),
        ):
            self._emit(schema.variable_tag(quantity), np.asarray(stats[row], np.float32),
                       step, self._meta(quantity, names))

    def write_json(self, tag: str, step: int, record: dict) -> None:
        """Writes a scalar string tensor holding ``record`` as JSON (a `schema.JSON_TAGS` tag)."""
        if tag not in schema.JSON_TAGS:
            raise ValueError(f"not a JSON tag: {tag!r}")
        quantity = schema.quantity_of_tag(tag)
        text = json.dumps(record, default=str, sort_keys=True)
        with tf.init_scope(), self.writer.as_default():
            tf.summary.write(
                tag, tf.constant(text, tf.string), step=int(step), metadata=self._meta(quantity)
            )

    # -- activation probes, data statistics and epoch logs (probes/data_stats) --

    def write_layers(self, step: int, table: dict) -> None:
        """Writes ``stability/layer/<q>`` vectors: ``table[q] = (layer_names, values)``."""
        for quantity, (names, values) in sorted(table.items()):
            if quantity not in schema.LAYER_QUANTITIES or not len(names):
                continue
            self._emit(schema.layer_tag(quantity), np.asarray(values, np.float32), step,
                       self._meta(quantity, tuple(names)))

    def write_inputs(self, step: int, stats: np.ndarray, names: Sequence[str]) -> None:
        """Writes ``stability/inputs`` ``[4, F]`` (rows mean/std/min/max)."""
        key = ("inputs", tuple(names), schema.INPUT_ROWS)
        if key not in self._metadata_cache:
            self._metadata_cache[key] = _metadata("inputs", names, schema.INPUT_ROWS)
        self._emit(schema.TAG_INPUTS, np.asarray(stats, np.float32), step,
                   self._metadata_cache[key])

    def write_counts(self, tag: str, step: int, counts: np.ndarray) -> None:
        """Writes class counts to ``stability/labels`` or ``stability/predictions``."""
        if tag not in (schema.TAG_LABELS, schema.TAG_PREDICTIONS):
            raise ValueError(f"not a class-count tag: {tag!r}")
        counts = np.asarray(counts, np.float32)
        names = tuple(str(i) for i in range(counts.shape[0]))
        self._emit(tag, counts, step, self._meta(schema.quantity_of_tag(tag), names))

    def write_scalars(self, step: int, values: dict) -> None:
        """Writes ordinary scalars (plugin ``scalars``, as ``tf.summary.scalar``)."""
        with tf.init_scope(), self.writer.as_default():
            for tag, value in values.items():
                try:
                    value = float(np.asarray(value))
                except (TypeError, ValueError):
                    continue
                tf.summary.scalar(str(tag), value, step=int(step))

    def flush(self) -> None:
        """Flushes pending events to disk (no-op before the first write)."""
        if self._pending:
            pending, self._pending = self._pending, []
            self._write_raw(pending)
        if self._writer is not None:
            with tf.init_scope():
                self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the file writer; a later write reopens a new file."""
        if self._pending:
            pending, self._pending = self._pending, []
            self._write_raw(pending)
        if self._writer is not None:
            with tf.init_scope():
                self._writer.close()
            self._writer = None


class Drainer:
    """Moves new rows and log steps from a `StepStats` into a `SummaryWriter`.

    Args:
      stats: The graph-side state to read.
      writer: Where to write.
      next_step: The first step not yet written.
    """

    def __init__(self, stats: StepStats, writer: SummaryWriter, next_step: int = 0):
        self.stats = stats
        self.writer = writer
        self.next_step = int(next_step)
        self.saw_nonfinite = False
        self.first_nonfinite_step: Optional[int] = None
        # Optional `readback.BatchedRead` already holding this drain's values.
        self.batch: Optional[readback.BatchedRead] = None
        # Objects with feed_steps(rows, columns) / feed_variables(step, stats, names),
        # e.g. `instrumentation.live.LiveDiagnosis`; they see exactly what is written.
        self.listeners: list = []

    def drain(self) -> int:
        """Writes every step recorded since the last call.

        Returns:
          The number of steps written. On the first non-finite loss, gradient
          norm or non-finite gradient count the writer is flushed at once.
        """
        ring = readback.fetch(self.stats.ring, self.batch)  # one device-to-host copy
        fresh = ring[ring[:, 0] >= self.next_step]
        if fresh.shape[0] == 0:
            return 0
        fresh = fresh[np.argsort(fresh[:, 0], kind="stable")]
        fresh[:, 2] = np.sqrt(fresh[:, 2])  # the ring holds the squared norm
        first, last = int(fresh[0, 0]), int(fresh[-1, 0])
        if first > self.next_step:
            warnings.warn(
                f"tb-stability: steps {self.next_step}..{first - 1} were overwritten "
                "before the host read them and are missing from the log",
                RuntimeWarning,
                stacklevel=2,
            )
        if self.stats.variables:
            # Log steps are whatever steps the slots hold in this range: the
            # host may choose them (the callback's two train functions).
            var_steps = readback.fetch(self.stats.var_steps, self.batch).astype(np.int64)
            in_range = np.flatnonzero((var_steps >= first) & (var_steps <= last))
            if in_range.size:
                var_stats = readback.fetch(self.stats.var_stats, self.batch)
                for slot in in_range[np.argsort(var_steps[in_range], kind="stable")]:
                    step = int(var_steps[slot])
                    self.writer.write_variables(step, var_stats[slot], self.stats.names)
                    for listener in self.listeners:
                        listener.feed_variables(step, var_stats[slot], self.stats.names)
        self.writer.write_steps(fresh)
        for listener in self.listeners:
            listener.feed_steps(fresh, getattr(self.stats, "columns", schema.STEP_COLUMNS))
        self.next_step = last + 1
        if not self.saw_nonfinite:
            values = fresh[:, 1:3]
            bad = ~np.isfinite(values).all(axis=1) | (fresh[:, 3] > 0)
            if bad.any():
                self.saw_nonfinite = True
                self.first_nonfinite_step = int(fresh[np.argmax(bad), 0])
                self.writer.flush()
        return int(fresh.shape[0])


def run_info(
    model: Any, optimizer: Any, every: int, names: Sequence[str], extra: Optional[dict] = None
) -> dict:
    """The ``stability/run_info`` record of a Keras model and optimizer."""
    from tb_stability import __version__

    info: dict = {
        "tb_stability_version": __version__,
        "every": int(every),
        "variables": list(names),
        "model_class": type(model).__name__ if model is not None else None,
        "optimizer": type(optimizer).__name__ if optimizer is not None else None,
    }
    try:
        info["optimizer_config"] = _jsonable(optimizer.get_config())
    except Exception:  # noqa: BLE001 - best effort, never fail training
        info["optimizer_config"] = None
    try:
        info["learning_rate"] = float(np.asarray(optimizer.learning_rate))
    except Exception:  # noqa: BLE001
        info["learning_rate"] = None
    loss = getattr(model, "loss", None)
    try:
        info["loss"] = _jsonable(loss) if not callable(loss) or isinstance(loss, str) else _describe(loss)
    except Exception:  # noqa: BLE001
        info["loss"] = repr(loss)
    try:
        info["jit_compile"] = bool(getattr(model, "jit_compile", False))
        info["steps_per_execution"] = int(getattr(model, "steps_per_execution", 1) or 1)
    except Exception:  # noqa: BLE001
        pass
    if extra:
        info.update(extra)
    return info


def _describe(obj: Any) -> Any:
    if hasattr(obj, "get_config"):
        try:
            return {"class_name": type(obj).__name__, "config": _jsonable(obj.get_config())}
        except Exception:  # noqa: BLE001
            pass
    return getattr(obj, "__name__", None) or type(obj).__name__


def _jsonable(value: Any) -> Any:
    """Converts nested configs to JSON-serialisable values (str as last resort)."""
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, float):
        return value if np.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)):
        return _jsonable(value.tolist())
    if callable(value):
        return _describe(value)
    return str(value)


def warn_disabled(what: str, error: BaseException, log: logging.Logger) -> None:
    """The one warning our own failure produces: ``what`` is switched off, training goes on."""
    warnings.warn(
        f"tb-stability: {what} disabled after an internal error "
        f"({type(error).__name__}: {error}); training continues",
        RuntimeWarning,
        stacklevel=4,
    )
    log.debug("%s error", what, exc_info=error)
