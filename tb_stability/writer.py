"""A TensorFlow-free writer of the tb-stability event-file contract.

Writes the summaries described in `tb_stability.schema` (and ordinary
scalars, as Keras' TensorBoard callback writes them) into TensorBoard event
files. Used by tests and benchmarks, and by anything that wants to produce
tb-stability data without TensorFlow.

Example::

    with StabilityWriter("logs/run1") as writer:
        writer.write_steps(block, schema.STEP_COLUMNS)  # block: [k, 5] float64
        writer.write_variables(99, "grad_norm", ["dense/kernel"], [0.5])
        writer.write_scalar("epoch_loss", 0, 0.7)
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from typing import Any, Iterable, Sequence

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2
from tensorboard.compat.proto import tensor_shape_pb2

from tb_stability import schema
from tb_stability.reader.tfrecord import encode_record

_FILE_COUNTER = itertools.count(1)
_DTYPES = {
    np.dtype(np.float32): types_pb2.DT_FLOAT,
    np.dtype(np.float64): types_pb2.DT_DOUBLE,
    np.dtype(np.int32): types_pb2.DT_INT32,
    np.dtype(np.int64): types_pb2.DT_INT64,
}


def event_file_name(suffix: str = "") -> str:
    """A new event file name, shaped like TensorFlow's.

    ``events.out.tfevents.<time>.<host>.<pid>.<n><suffix>``, where ``n``
    counts the files named in this process, so two writers never collide.
    """
    return "events.out.tfevents.%010d.%s.%d.%d%s" % (
        int(time.time()), socket.gethostname(), os.getpid(), next(_FILE_COUNTER), suffix)


def make_tensor_proto(array: Any) -> tensor_pb2.TensorProto:
    """Encodes a numeric numpy array (float32/64, int32/64) as a `TensorProto`.

    Args:
      array: Array-like; other dtypes are converted to float64.

    Returns:
      A `TensorProto` with ``tensor_content`` set (little endian).
    """
    array = np.asarray(array)
    if array.dtype not in _DTYPES:
        array = array.astype(np.float64)
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in array.shape]
    )
    return tensor_pb2.TensorProto(
        dtype=_DTYPES[array.dtype],
        tensor_shape=shape,
        tensor_content=np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes(),
    )


def make_string_tensor_proto(value: str | bytes) -> tensor_pb2.TensorProto:
    """Encodes a scalar string tensor."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING, tensor_shape=tensor_shape_pb2.TensorShapeProto(),
        string_val=[value],
    )


class StabilityWriter:
    """Writes one event file in a run directory.

    Metadata is written on the first event of each tag in the file, as
    TensorFlow's summary writer does.

    Args:
      run_dir: Run directory (created if missing).
      filename_suffix: Suffix of the event file name.
      wall_time: Optional fixed wall time (for reproducible files); defaults to
        the current time for each event.
    """

    def __init__(self, run_dir: str | os.PathLike, filename_suffix: str = ".stability",
                 wall_time: float | None = None):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(os.fspath(run_dir), event_file_name(filename_suffix))
        self._wall_time = wall_time
        self._file = open(self.path, "wb")
        self._tags_seen: dict[str, bytes] = {}  # tag -> the metadata last written with it
        self.write_event(event_pb2.Event(file_version="brain.Event:2"))

    # -- low level -----------------------------------------------------------

    def write_event(self, event: event_pb2.Event) -> None:
        """Writes one `Event` (``wall_time`` is filled in when unset)."""
        if not event.wall_time:
            event.wall_time = self._wall_time if self._wall_time is not None else time.time()
        self._file.write(encode_record(event.SerializeToString()))

    def write_raw_record(self, data: bytes) -> None:
        """Writes arbitrary bytes as one framed record (for tests)."""
        self._file.write(encode_record(data))

    def _write_value(self, step: int, tag: str, tensor: tensor_pb2.TensorProto,
                     metadata: summary_pb2.SummaryMetadata) -> None:
        value = summary_pb2.Summary.Value(tag=tag, tensor=tensor)
        # As TensorFlow, metadata on a tag's first event; and again whenever it
        # changes (other names: the model's variables changed), or the reader
        # would pair the new values with the old names.
        serialized = metadata.SerializeToString(deterministic=True)
        if self._tags_seen.get(tag) != serialized:
            value.metadata.CopyFrom(metadata)
            self._tags_seen[tag] = serialized
        self.write_event(event_pb2.Event(step=int(step), summary=summary_pb2.Summary(value=[value])))

    # -- the stability contract ----------------------------------------------

    def write_steps(self, block: np.ndarray, columns: Sequence[str] = schema.STEP_COLUMNS) -> None:
        """Writes a block of consecutive per-step rows (``stability/steps``).

        Args:
          block: float64 array ``[k, len(columns)]``, one row per step.
          columns: Column names; must include ``"step"``.
        """
        block = np.asarray(block, dtype=np.float64)
        if block.ndim != 2 or block.shape[1] != len(columns):
            raise ValueError(f"block must be [k, {len(columns)}], got {block.shape}")
        if block.shape[0] == 0:
            return
        step = int(block[-1, list(columns).index("step")])
        metadata = schema.create_summary_metadata("steps", names=columns)
        self._write_value(step, schema.TAG_STEPS, make_tensor_proto(block), metadata)

    def write_variables(self, step: int, quantity: str, names: Sequence[str],
                        values: Iterable[float]) -> None:
        """Writes one per-variable vector (``stability/var/<quantity>``)."""
        self._write_vector(step, schema.variable_tag(quantity), quantity, names, values)

    def write_layers(self, step: int, quantity: str, names: Sequence[str],
                     values: Iterable[float]) -> None:
        """Writes one per-layer activation vector (``stability/layer/<quantity>``)."""
        self._write_vector(step, schema.layer_tag(quantity), quantity, names, values)

    def write_inputs(self, step: int, feature_names: Sequence[str], stats: np.ndarray,
                     rows: Sequence[str] = schema.INPUT_ROWS) -> None:
        """Writes input statistics ``[len(rows), num_features]`` (``stability/inputs``)."""
        self._write_rows(step, schema.TAG_INPUTS, "inputs", feature_names, stats, rows)

    def write_targets(self, step: int, target_names: Sequence[str], stats: np.ndarray) -> None:
        """Writes regression label statistics ``[4, num_targets]`` (``stability/targets``)."""
        self._write_rows(step, schema.TAG_TARGETS, "targets", target_names, stats,
                         schema.INPUT_ROWS)

    def _write_rows(self, step: int, tag: str, quantity: str, names: Sequence[str],
                    stats: np.ndarray, rows: Sequence[str]) -> None:
        metadata = schema.create_summary_metadata(quantity, names=names, rows=rows)
        self._write_value(step, tag, make_tensor_proto(np.asarray(stats, dtype=np.float32)),
                          metadata)

    def write_labels(self, step: int, class_names: Sequence[str], counts: Iterable[float]) -> None:
        """Writes label class counts (``stability/labels``)."""
        self._write_vector(step, schema.TAG_LABELS, "labels", class_names, counts)

    def write_predictions(self, step: int, class_names: Sequence[str],
                          counts: Iterable[float]) -> None:
        """Writes predicted class counts (``stability/predictions``)."""
        self._write_vector(step, schema.TAG_PREDICTIONS, "predictions", class_names, counts)

    def _write_vector(self, step, tag, quantity, names, values) -> None:
        values = np.asarray(list(values) if not hasattr(values, "shape") else values,
                            dtype=np.float32)
        metadata = schema.create_summary_metadata(quantity, names=names)
        self._write_value(step, tag, make_tensor_proto(values), metadata)

    def write_json(self, tag: str, step: int, obj: Any) -> None:
        """Writes a JSON object as a scalar string tensor (e.g. ``stability/run_info``)."""
        quantity = schema.quantity_of_tag(tag) or tag
        metadata = schema.create_summary_metadata(quantity)
        tensor = make_string_tensor_proto(json.dumps(obj, allow_nan=True))
        self._write_value(step, tag, tensor, metadata)

    # -- ordinary scalars ----------------------------------------------------

    def write_scalar(self, tag: str, step: int, value: float) -> None:
        """Writes a scalar as TF2 / Keras does (float32 tensor, plugin ``scalars``)."""
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
            data_class=summary_pb2.DATA_CLASS_SCALAR,
        )
        tensor = make_tensor_proto(np.asarray(value, dtype=np.float32))
        self._write_value(step, tag, tensor, metadata)

    def write_legacy_scalar(self, tag: str, step: int, value: float) -> None:
        """Writes a TF1-style ``simple_value`` scalar."""
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
        self.write_event(event_pb2.Event(step=int(step), summary=summary))

    # -- lifecycle -------------------------------------------------------------

    def flush(self) -> None:
        """Flushes buffered events to disk."""
        self._file.flush()

    def close(self) -> None:
        """Flushes and closes the file (idempotent)."""
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "StabilityWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
