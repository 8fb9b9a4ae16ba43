"""Event and Summary protos encoded by hand, as TensorFlow's summary kernels write them.

`encode_summary` (one float32/float64 tensor), `encode_string_summary` (one
scalar string) and `encode_event` (wall time, step, summary) write the proto
fields directly; `FILE_VERSION` is the ``brain.Event:2`` event every event
file starts with. For a given tag, metadata, dtype and shape every byte of a
tensor summary but its content repeats from one step to the next, so those
bytes are cached. `instrumentation.writer` appends the results with
``tf.io.TFRecordWriter``.
"""

from __future__ import annotations

import functools
import struct
import time
from typing import Optional

import numpy as np

_DT = {np.dtype(np.float32): 1, np.dtype(np.float64): 2}  # tensorflow DataType enum


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]
    if value < 0x4000:  # steps below 16384, lengths of summaries below 16 KiB
        return bytes((value & 0x7F | 0x80, value >> 7))
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


_ONE_BYTE = tuple(bytes((value,)) for value in range(0x80))


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_summary(tag: str, array: np.ndarray, metadata: bytes) -> bytes:
    """A serialized ``Summary`` holding one tensor value, as ``tf.summary.write`` builds it.

    The same fields as TensorFlow's ``WriteSummary`` kernel (``tag``, a
    ``TensorProto`` with ``dtype``, ``tensor_shape`` and ``tensor_content``,
    and the metadata), encoded directly: float32/float64 arrays only. For a
    given tag, metadata, dtype and shape every byte but the tensor content is
    the same from one step to the next, so those bytes are cached.
    """
    array = np.ascontiguousarray(array)
    prefix, suffix = _summary_frame(tag, metadata, _DT[array.dtype], array.shape,
                                    array.nbytes)
    return prefix + array.tobytes() + suffix


@functools.lru_cache(maxsize=256)
def _summary_frame(tag: str, metadata: bytes, dtype: int, shape: tuple,
                   nbytes: int) -> tuple[bytes, bytes]:
    """The bytes of `encode_summary` before and after the tensor content."""
    dims = b"".join(_field(2, b"\x08" + _varint(int(d))) if d else _field(2, b"")
                    for d in shape)
    header = b"\x08" + _varint(dtype) + _field(2, dims)
    if nbytes:  # proto3 leaves an empty tensor_content out
        header += _varint(4 << 3 | 2) + _varint(nbytes)
    tag_field, meta_field = _field(1, tag.encode("utf-8")), _field(9, metadata)
    tensor_len = len(header) + nbytes
    tensor_head = _varint(8 << 3 | 2) + _varint(tensor_len)
    value_len = len(tag_field) + len(tensor_head) + tensor_len + len(meta_field)
    prefix = _varint(1 << 3 | 2) + _varint(value_len) + tag_field + tensor_head + header
    return prefix, meta_field


def encode_event(step: int, summary: bytes, wall_time: Optional[float] = None) -> bytes:
    """A serialized ``Event`` (wall_time, step, summary) around a serialized ``Summary``."""
    wall_time = time.time() if wall_time is None else float(wall_time)
    return (b"\x09" + struct.pack("<d", wall_time)
            + b"\x10" + _varint(int(step) & 0xFFFFFFFFFFFFFFFF)
            + _field(5, summary))


def encode_string_summary(tag: str, text: str, metadata: bytes) -> bytes:
    """A serialized ``Summary`` holding one scalar string tensor (``tf.summary.write``)."""
    tensor = b"\x08\x07" + _field(2, b"") + _field(8, text.encode("utf-8"))  # DT_STRING
    return _field(1, _field(1, tag.encode("utf-8")) + _field(8, tensor) + _field(9, metadata))


FILE_VERSION = b"\x09" + struct.pack("<d", 0.0) + _field(3, b"brain.Event:2")
