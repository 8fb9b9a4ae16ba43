"""Decodes the events of one event file into compact, unsorted per-tag segments.

A `FileState` holds what has been read from one file so far, and can be
continued from its saved offset when the file grows (TensorBoard event
files are append-only). Decoded data is kept as a few concatenated float64
arrays per tag (`tb_stability.reader.segments`), never as per-record objects.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from typing import Any

import numpy as np
from tensorboard.compat.proto import event_pb2

from tb_stability import schema
from tb_stability.reader import keras_model
from tb_stability.reader import segments as seg
from tb_stability.reader.tfrecord import FrameProblem, iter_records

_SCALARS_PLUGIN = "scalars"

# TensorFlow DataType enum -> numpy dtype (little endian) and the repeated
# field holding values when tensor_content is empty.
_DTYPES = {
    1: (np.dtype("<f4"), "float_val"),
    2: (np.dtype("<f8"), "double_val"),
    3: (np.dtype("<i4"), "int_val"),
    4: (np.dtype("u1"), "int_val"),
    5: (np.dtype("<i2"), "int_val"),
    6: (np.dtype("i1"), "int_val"),
    9: (np.dtype("<i8"), "int64_val"),
    10: (np.dtype("?"), "bool_val"),
    17: (np.dtype("<u2"), "int_val"),
    19: (np.dtype("<f2"), "half_val"),
    22: (np.dtype("<u4"), "uint32_val"),
    23: (np.dtype("<u8"), "uint64_val"),
}
_DT_STRING = 7
_DT_HALF = 19


def tensor_to_array(tensor) -> np.ndarray:
    """Decodes a numeric or string `TensorProto` into a numpy array.

    Raises:
      ValueError: For unsupported dtypes or inconsistent sizes.
    """
    shape = tuple(d.size for d in tensor.tensor_shape.dim)
    size = math.prod(shape)
    if tensor.dtype == _DT_STRING:
        values = list(tensor.string_val)
        if len(values) == 1 and size != 1:
            values = values * size
        return np.array(values, dtype=object).reshape(shape)
    try:
        dtype, field = _DTYPES[tensor.dtype]
    except KeyError:
        raise ValueError(f"unsupported tensor dtype {tensor.dtype}") from None
    if tensor.tensor_content:
        array = np.frombuffer(tensor.tensor_content, dtype=dtype)
    else:
        values = getattr(tensor, field)
        if tensor.dtype == _DT_HALF:
            array = np.array(values, dtype=np.uint16).view(np.float16)
        else:
            array = np.array(values, dtype=dtype)
        if array.size == 1 and size != 1:  # TF writes one value for a constant fill
            array = np.repeat(array, size)
    if array.size != size:
        raise ValueError(f"tensor has {array.size} values for shape {shape}")
    return array.reshape(shape)


@dataclasses.dataclass
class FileState:
    """What has been read from one event file.

    Attributes:
      path: Absolute path of the file.
      label: How warnings name the file (path relative to the logdir).
      size: File size when last read.
      mtime_ns: Modification time when last read.
      offset: Offset of the first byte not yet consumed (the start of an
        incomplete final record, if any).
      dead: True once a fatal corruption was met; the file is not read further.
      meta: tag -> (plugin name, content bytes) from the first event carrying it.
      contents: tag -> parsed `schema.Content`, or None when unusable.
      blocks: ``stability/steps`` records as column-major `segments.Segment`s.
      tensors: other stability tags: tag -> list of `segments.Segment`.
      scalars: tag -> list of `segments.Segment`.
      json: tag -> list of (step, dict).
      keras_model: The last model JSON Keras' TensorBoard callback wrote
        (tag ``keras``; `keras_model`), or None.
      warnings: Persistent warnings (corruption in the middle, bad metadata).
      tail_warning: Warning about an incomplete final record, replaced on each
        read (a file being written often ends mid-record).
    """

    path: str
    label: str
    size: int = -1
    mtime_ns: int = -1
    offset: int = 0
    dead: bool = False
    meta: dict[str, tuple[str, bytes]] = dataclasses.field(default_factory=dict)
    contents: dict[str, Any] = dataclasses.field(default_factory=dict)
    blocks: list[seg.Segment] = dataclasses.field(default_factory=list)
    tensors: dict[str, list[seg.Segment]] = dataclasses.field(default_factory=dict)
    scalars: dict[str, list[seg.Segment]] = dataclasses.field(default_factory=dict)
    json: dict[str, list] = dataclasses.field(default_factory=dict)
    keras_model: bytes | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    tail_warning: str | None = None

    def all_warnings(self) -> list[str]:
        """Persistent warnings plus the current tail warning."""
        return self.warnings + ([self.tail_warning] if self.tail_warning else [])

    def consolidate(self) -> None:
        """Merges adjacent segments of each tag (call after a file is read)."""
        self.blocks = seg.consolidate(self.blocks)
        for table in (self.tensors, self.scalars):
            for tag, segments in table.items():
                table[tag] = seg.consolidate(segments)


class _Batch:
    """Records decoded by one `read_file_into` call, before compaction."""

    __slots__ = ("tensors", "scalars", "last")

    def __init__(self):
        self.tensors: dict[str, list[seg.Pending]] = {}
        self.scalars: dict[str, tuple[list, list]] = {}
        self.last: dict[str, seg.Pending] = {}  # tag -> its latest pending run

    def flush_into(self, state: FileState) -> None:
        for tag, runs in self.tensors.items():
            for pending in runs:
                if tag == schema.TAG_STEPS:
                    state.blocks.append(seg.steps_segment(pending))
                else:
                    state.tensors.setdefault(tag, []).append(seg.tensor_segment(pending))
        for tag, (steps, values) in self.scalars.items():
            state.scalars.setdefault(tag, []).append(seg.scalar_segment(steps, values))
        self.tensors.clear()
        self.scalars.clear()
        self.last.clear()


def read_file_into(state: FileState, buf: bytes, start: int) -> None:
    """Parses the records of ``buf`` (the file's bytes from offset ``start``).

    Updates ``state`` in place; never raises for bad data. ``buf`` may end in
    the middle of a record: ``state.offset`` then points at that record and a
    tail warning says so (the next call, with more bytes, replaces it).
    """
    state.tail_warning = None
    batch = _Batch()
    try:
        _parse(state, buf, start, batch)
    finally:
        batch.flush_into(state)


def _parse(state: FileState, buf: bytes, start: int, batch: _Batch) -> None:
    from_string = event_pb2.Event.FromString
    for offset, end, payload in iter_records(buf):
        offset += start
        if isinstance(payload, FrameProblem):
            if payload.kind == "truncated":
                state.tail_warning = (
                    f"{state.label}: truncated record at offset {offset} "
                    f"(file ends after {start + len(buf)} bytes); stopped there"
                )
                state.offset = offset
                return
            if payload.kind == "bad_header":
                what = "not an event file" if offset == 0 else "corrupt record header"
                state.warnings.append(
                    f"{state.label}: {what} (record length CRC mismatch at offset "
                    f"{offset}); ignored the rest of the file"
                )
                state.dead = True
                state.offset = start + len(buf)
                return
            state.warnings.append(
                f"{state.label}: data CRC mismatch in record at offset {offset}; "
                "skipped that record"
            )
            continue
        try:
            event = from_string(payload)
        except Exception:
            state.warnings.append(
                f"{state.label}: undecodable event at offset {offset}; skipped that record"
            )
        else:
            if event.HasField("summary"):
                _read_summary(state, event, offset, batch)
    state.offset = start + len(buf)


def _read_summary(state: FileState, event, offset: int, batch: _Batch) -> None:
    step = event.step
    meta = state.meta
    for value in event.summary.value:
        tag = value.tag
        if value.HasField("metadata"):
            plugin = value.metadata.plugin_data
            plugin_name = plugin.plugin_name
            if plugin_name:
                known = meta.get(tag)
                if known is None or known != (plugin_name, plugin.content):
                    meta[tag] = (plugin_name, plugin.content)
                    state.contents.pop(tag, None)
        kind = value.WhichOneof("value")
        if kind == "simple_value":
            _add_scalar(batch, tag, step, value.simple_value)
            continue
        if kind != "tensor":
            continue
        known = meta.get(tag)
        if known is None:
            continue
        try:
            if known[0] == schema.PLUGIN_NAME:
                _read_stability(state, batch, tag, step, value.tensor, known[1])
            elif known[0] == _SCALARS_PLUGIN:
                scalar = _scalar_value(value.tensor)
                if scalar is not None:
                    _add_scalar(batch, tag, step, scalar)
            elif known[0] == keras_model.PLUGIN_NAME and value.tensor.string_val:
                state.keras_model = bytes(value.tensor.string_val[0])
        except Exception as error:  # bad tensor, bad JSON: warn, keep going
            state.warnings.append(
                f"{state.label}: could not decode tag {tag!r} at step {step} "
                f"(offset {offset}): {error}"
            )


_F32 = struct.Struct("<f")
_F64 = struct.Struct("<d")


def _scalar_value(tensor) -> float | None:
    """The value of a one-element numeric tensor (fast paths for float32/64)."""
    dtype = tensor.dtype
    content = tensor.tensor_content
    if dtype == 1:
        if len(content) == 4:
            return _F32.unpack(content)[0]
        if not content and len(tensor.float_val) == 1:
            return tensor.float_val[0]
    elif dtype == 2:
        if len(content) == 8:
            return _F64.unpack(content)[0]
        if not content and len(tensor.double_val) == 1:
            return tensor.double_val[0]
    array = tensor_to_array(tensor)
    if array.size == 1 and array.dtype != object:
        return float(array.reshape(()))
    return None


def _add_scalar(batch: _Batch, tag: str, step: int, value: float) -> None:
    entry = batch.scalars.get(tag)
    if entry is None:
        entry = batch.scalars[tag] = ([], [])
    entry[0].append(step)
    entry[1].append(value)


def _content(state: FileState, tag: str, raw: bytes):
    if tag in state.contents:
        return state.contents[tag]
    try:
        content = schema.parse_content(raw)
    except schema.UnknownMetadataVersion as error:
        state.warnings.append(f"{state.label}: tag {tag!r}: {error}; skipped the tag")
        content = None
    except ValueError as error:
        state.warnings.append(f"{state.label}: tag {tag!r}: {error}; skipped the tag")
        content = None
    state.contents[tag] = content
    return content


# Serialized TensorShapeProto -> shape tuple (a handful of distinct shapes per file).
_SHAPES: dict[bytes, tuple[int, ...]] = {}


def _shape(proto, key: bytes) -> tuple[int, ...]:
    shape = _SHAPES.get(key)
    if shape is None:
        shape = tuple(d.size for d in proto.dim)
        if any(d < 0 for d in shape):
            raise ValueError(f"tensor has an unknown shape {shape}")
        if len(_SHAPES) < 4096:
            _SHAPES[key] = shape
    return shape


def _read_stability(state: FileState, batch: _Batch, tag: str, step: int, tensor,
                    raw: bytes) -> None:
    contents = state.contents
    content = contents[tag] if tag in contents else _content(state, tag, raw)
    if content is None:
        return
    if tag in schema.JSON_TAGS:
        array = tensor_to_array(tensor)
        text = array.reshape(-1)[0]
        obj = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
        state.json.setdefault(tag, []).append((step, obj))
        return
    code = tensor.dtype
    proto = tensor.tensor_shape
    shape_key = proto.SerializeToString()
    data = tensor.tensor_content
    # Fast path: same metadata, dtype, shape and size as the tag's previous record.
    last = batch.last.get(tag)
    if last is not None and last.match == (content, code, shape_key, len(data)):
        last.steps.append(step)
        last.data += data
        return
    if code == _DT_STRING:
        raise ValueError("expected a numeric tensor")
    shape = _shape(proto, shape_key)
    entry = _DTYPES.get(code)
    if entry is None:
        raise ValueError(f"unsupported tensor dtype {code}")
    dtype = entry[0]
    match = None
    if data:
        if len(data) != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor has {len(data) / dtype.itemsize:g} values "
                             f"for shape {shape}")
        match = (content, code, shape_key, len(data))
    else:
        data = tensor_to_array(tensor).tobytes()
    if tag == schema.TAG_STEPS and (len(shape) != 2 or shape[1] != len(content.names)):
        raise ValueError(
            f"steps block of shape {shape} does not match "
            f"{len(content.names)} column names"
        )
    runs = batch.tensors.get(tag)
    if runs is None:
        runs = batch.tensors[tag] = []
    key = (content, dtype, shape)
    if not runs or runs[-1].key != key:
        runs.append(seg.Pending(key))
    pending = runs[-1]
    pending.match = match
    batch.last[tag] = pending
    pending.steps.append(step)
    pending.data += data
