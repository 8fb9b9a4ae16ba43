"""Host-side writing: reads `StepStats` variables and writes the schema's summaries.

Runs eagerly, outside any compiled step. The only module of `instrumentation`
that writes event files; every tag and metadata comes from
`tb_stability.schema`.

Events are encoded by `instrumentation.event_encoding` (``Event`` and
``Summary`` protos written field by field, as TensorFlow's summary kernels
would) and appended with
``tf.io.TFRecordWriter`` (TFRecord framing and CRCs in C++). One host read
writes dozens of events (one per step, tag and record); through the
``tf.summary`` ops that cost one op dispatch per step, here it is one
function call per event.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import warnings
from typing import Any, Optional, Sequence

import numpy as np
import tensorflow as tf


from tb_stability import schema
from tb_stability.writer import event_file_name

from instrumentation import host_jobs, readback
from instrumentation.event_encoding import (
    FILE_VERSION, encode_event, encode_string_summary, encode_summary,
)
from instrumentation.stats import GRAD_NORM, UPDATE_RATIO, WEIGHT_NORM, StepStats

logger = logging.getLogger("instrumentation")


def _metadata(quantity: str, names: Sequence[str] = (), rows: Sequence[str] = ()) -> bytes:
    return schema.create_summary_metadata(quantity, names=names, rows=rows).SerializeToString()


@functools.lru_cache(maxsize=1)
def _scalar_metadata() -> bytes:
    """The metadata ``tf.summary.scalar`` writes (plugin ``scalars``, scalar data class)."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.scalar import metadata as scalar_metadata

    meta = scalar_metadata.create_summary_metadata(display_name="", description="")
    meta.data_class = summary_pb2.DATA_CLASS_SCALAR
    return meta.SerializeToString()


class SummaryWriter:
    """Writes stability summaries into one run directory.

    The event file (`writer`) is created on first use.

    Args:
      log_dir: The run directory.
    """

    def __init__(self, log_dir: str):
        self.log_dir = str(log_dir)
        self._writer = None
        self._metadata_cache: dict = {}
        self._pending: Optional[list] = None
        # Added to every training step written (not to epochs): a later fit with a
        # fresh optimizer, whose iterations restart at 0, continues the run's steps.
        self.step_offset = 0

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

    def _emit(self, tag: str, array: np.ndarray, step: int, metadata: bytes,
              training_step: bool = True) -> None:
        step = int(step) + (self.step_offset if training_step else 0)
        self._emit_summary(step, encode_summary(tag, array, metadata))

    def _emit_summary(self, step: int, summary: bytes) -> None:
        host_jobs.pause()  # on the worker thread: the training thread may take the GIL
        event = encode_event(step, summary)
        if self._pending is not None:
            self._pending.append(event)
        else:
            self._write_raw([event])

    def _write_raw(self, events: list) -> None:
        """Appends serialized ``Event`` records to this writer's event file."""
        if not events:
            return
        writer = self.writer
        for event in events:
            writer.write(event)

    @property
    def writer(self):
        """The lazily created ``tf.io.TFRecordWriter`` of this run's event file.

        The file is named like TensorFlow's (``events.out.tfevents.<time>.
        <host>.<pid>.<n>``) with the suffix ``.stability.v2``; it starts with
        the ``brain.Event:2`` file-version event.
        """
        if self._writer is None:
            tf.io.gfile.makedirs(self.log_dir)
            name = event_file_name(".stability.v2")
            writer = tf.io.TFRecordWriter(os.path.join(self.log_dir, name))
            writer.write(FILE_VERSION)
            self._writer = writer
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
        if self.step_offset:
            rows = rows.copy()
            rows[:, list(columns).index("step")] += self.step_offset
        self._emit(schema.TAG_STEPS, rows, int(rows[-1, 0]), self._meta("steps", columns),
                   training_step=False)  # the step column already holds the offset

    def write_variables(self, step: int, stats: np.ndarray, names: Sequence[str]) -> None:
        """Writes ``stats[GRAD_NORM|WEIGHT_NORM|UPDATE_RATIO]`` vectors for one step.

        ``stats`` may hold only the first two rows (no update ratio measured).
        """
        names = tuple(names)
        for quantity, row in (
            ("grad_norm", GRAD_NORM),
            ("weight_norm", WEIGHT_NORM),
            ("update_ratio", UPDATE_RATIO),
        ):
            if row >= len(stats):
                continue
            self._emit(schema.variable_tag(quantity), np.asarray(stats[row], np.float32),
                       step, self._meta(quantity, names))

    def write_json(self, tag: str, step: int, record: dict) -> None:
        """Writes a scalar string tensor holding ``record`` as JSON (a `schema.JSON_TAGS` tag)."""
        if tag not in schema.JSON_TAGS:
            raise ValueError(f"not a JSON tag: {tag!r}")
        quantity = schema.quantity_of_tag(tag)
        if self.step_offset and isinstance(record.get("step"), int):
            record = {**record, "step": record["step"] + self.step_offset}
        text = json.dumps(record, default=str, sort_keys=True)
        self._emit_summary(int(step) + self.step_offset,
                           encode_string_summary(tag, text, self._meta(quantity)))

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
        self._write_rows(schema.TAG_INPUTS, "inputs", step, stats, names)

    def write_targets(self, step: int, stats: np.ndarray, names: Sequence[str]) -> None:
        """Writes ``stability/targets`` ``[4, T]``: a regression output's labels, rows as inputs."""
        self._write_rows(schema.TAG_TARGETS, "targets", step, stats, names)

    def _write_rows(self, tag: str, quantity: str, step: int, stats: np.ndarray,
                    names: Sequence[str]) -> None:
        key = (quantity, tuple(names), schema.INPUT_ROWS)
        if key not in self._metadata_cache:
            self._metadata_cache[key] = _metadata(quantity, names, schema.INPUT_ROWS)
        self._emit(tag, np.asarray(stats, np.float32), step, self._metadata_cache[key])

    def write_counts(self, tag: str, step: int, counts: np.ndarray) -> None:
        """Writes class counts to ``stability/labels`` or ``stability/predictions``."""
        if tag not in (schema.TAG_LABELS, schema.TAG_PREDICTIONS):
            raise ValueError(f"not a class-count tag: {tag!r}")
        counts = np.asarray(counts, np.float32)
        self._emit(tag, counts, step,
                   self._meta(schema.quantity_of_tag(tag), _class_names(counts.shape[0])))

    def write_scalars(self, step: int, values: dict) -> None:
        """Writes ordinary scalars (plugin ``scalars``, as ``tf.summary.scalar``) at ``step`` as given
        (an epoch: no `step_offset`)."""
        for tag, value in values.items():
            try:
                value = np.asarray(float(np.asarray(value)), np.float32)
            except (TypeError, ValueError):
                continue
            self._emit(str(tag), value, int(step), _scalar_metadata(), training_step=False)

    def flush(self) -> None:
        """Flushes pending events to disk (no-op before the first write)."""
        if self._pending:
            pending, self._pending = self._pending, []
            self._write_raw(pending)
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the file writer; a later write reopens a new file."""
        if self._pending:
            pending, self._pending = self._pending, []
            self._write_raw(pending)
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@functools.lru_cache(maxsize=16)
def _class_names(classes: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(classes))


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
        # The loss column holds no loss (a train step whose loss the
        # instrumentation cannot see): it is left out rather than written as NaN.
        self.omit_loss = False
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
                "before the host read them and are missing from the log (a custom loop "
                "must call StabilityMonitor.tick() after every step: it reads the statistics "
                "before the device-side ring wraps around)",
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
                # Without weight snapshots the update ratio is not measured (NaN):
                # it is left out rather than written as a non-finite value.
                rows = UPDATE_RATIO + bool(self.stats.measure_update)
                for slot in in_range[np.argsort(var_steps[in_range], kind="stable")]:
                    step = int(var_steps[slot])
                    record = var_stats[slot][:rows]
                    self.writer.write_variables(step, record, self.stats.names)
                    for listener in self.listeners:
                        listener.feed_variables(step, record, self.stats.names)
        columns = tuple(getattr(self.stats, "columns", schema.STEP_COLUMNS))
        written = fresh
        if self.omit_loss:
            written = np.delete(fresh, columns.index("loss"), axis=1)
            columns = tuple(c for c in columns if c != "loss")
        self.writer.write_steps(written, columns)
        for listener in self.listeners:
            listener.feed_steps(written, columns)
        self.next_step = last + 1
        if not self.saw_nonfinite:
            values = fresh[:, 2:3] if self.omit_loss else fresh[:, 1:3]
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


class ColumnsWriter:
    """Wraps a `SummaryWriter` so that steps blocks carry ``columns`` as names."""

    def __init__(self, writer: Any, columns: Sequence[str]):
        self._writer = writer
        self.columns = tuple(columns)

    def write_steps(self, rows: Any, columns: Optional[Sequence[str]] = None) -> None:
        """Writes a steps block with this writer's column names."""
        self._writer.write_steps(rows, columns or self.columns)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)
