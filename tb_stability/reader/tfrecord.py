"""TFRecord framing and CRC32C, without TensorFlow.

A TFRecord file is a sequence of records::

    uint64  length            (little endian)
    uint32  masked_crc32c(length bytes)
    byte    data[length]
    uint32  masked_crc32c(data)

CRC32C (Castagnoli) uses the ``crc32c`` or ``google_crc32c`` package when one
is installed (optional speedups) and a table-driven pure-Python fallback
otherwise.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Callable, Iterator

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
HEADER_SIZE = _HEADER.size  # 12
FOOTER_SIZE = _FOOTER.size  # 4


def _make_table() -> list[list[int]]:
    poly = 0x82F63B78
    table0 = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table0.append(crc)
    tables = [table0]
    for _ in range(7):
        prev = tables[-1]
        tables.append([(prev[i] >> 8) ^ table0[prev[i] & 0xFF] for i in range(256)])
    return tables


_TABLES = _make_table()


def crc32c_python(data: bytes) -> int:
    """Pure-Python CRC32C (slicing-by-8), the fallback implementation.

    Args:
      data: Bytes to checksum.

    Returns:
      The unmasked CRC32C as an int.
    """
    t0, t1, t2, t3, t4, t5, t6, t7 = _TABLES
    crc = 0xFFFFFFFF
    view = memoryview(data)
    n = len(view)
    head = n - n % 8
    if head:
        for (word,) in struct.iter_unpack("<Q", view[:head]):
            x = crc ^ (word & 0xFFFFFFFF)
            hi = word >> 32
            crc = (
                t7[x & 0xFF] ^ t6[(x >> 8) & 0xFF] ^ t5[(x >> 16) & 0xFF] ^ t4[x >> 24]
                ^ t3[hi & 0xFF] ^ t2[(hi >> 8) & 0xFF] ^ t1[(hi >> 16) & 0xFF]
                ^ t0[hi >> 24]
            )
    for byte in view[head:]:
        crc = t0[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _fast_crc32c() -> tuple[Callable[[bytes], int], str]:
    try:
        import crc32c as _crc32c_mod  # optional speedup

        return _crc32c_mod.crc32c, "crc32c"
    except Exception:  # ImportError, or a broken binary wheel
        pass
    try:
        import google_crc32c  # optional speedup

        return (lambda data: google_crc32c.value(bytes(data))), "google_crc32c"
    except Exception:
        pass
    return crc32c_python, "python"


crc32c, CRC_IMPLEMENTATION = _fast_crc32c()


def masked_crc32c(data: bytes) -> int:
    """The masked CRC32C TFRecord stores (rotated right by 15, plus a delta)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def encode_record(data: bytes) -> bytes:
    """Frames one record (length, CRC of length, data, CRC of data)."""
    length = struct.pack("<Q", len(data))
    return length + _FOOTER.pack(masked_crc32c(length)) + data + _FOOTER.pack(
        masked_crc32c(data)
    )


@dataclasses.dataclass
class FrameProblem:
    """A problem met while framing records.

    Attributes:
      offset: Byte offset of the record where it happened.
      kind: ``"truncated"`` (incomplete final record; the file may still be
        being written), ``"bad_header"`` (length CRC mismatch: the rest of the
        file cannot be trusted) or ``"bad_data"`` (data CRC mismatch: that
        record is skipped).
      fatal: Whether reading the file stops there.
    """

    offset: int
    kind: str
    fatal: bool


def iter_records(
    buf: bytes, start: int = 0, verify: bool = True
) -> Iterator[tuple[int, int, bytes | FrameProblem]]:
    """Iterates over the records in ``buf`` from offset ``start``.

    Never raises for bad data: problems are yielded as `FrameProblem`.

    Args:
      buf: The file contents (bytes or memoryview).
      start: Offset of the first record.
      verify: Whether to check the data CRCs (length CRCs are always checked).

    Yields:
      ``(offset, end, payload)``: ``offset`` where the record starts, ``end``
      where the next one starts, ``payload`` the record's data (a memoryview
      slice) or a `FrameProblem`. After a fatal problem iteration stops.
    """
    view = memoryview(buf)
    total = len(view)
    offset = start
    unpack_header = _HEADER.unpack_from
    unpack_footer = _FOOTER.unpack_from
    crc = crc32c  # masked_crc32c inlined below: this loop runs once per event
    delta, mask = _MASK_DELTA, 0xFFFFFFFF
    while offset < total:
        if total - offset < HEADER_SIZE:
            yield offset, total, FrameProblem(offset, "truncated", True)
            return
        length, length_crc = unpack_header(view, offset)
        value = crc(view[offset:offset + 8])
        if (((value >> 15) | (value << 17)) + delta) & mask != length_crc:
            yield offset, total, FrameProblem(offset, "bad_header", True)
            return
        data_start = offset + HEADER_SIZE
        end = data_start + length + FOOTER_SIZE
        if end > total:
            yield offset, total, FrameProblem(offset, "truncated", True)
            return
        data = view[data_start:data_start + length]
        if verify:
            value = crc(data)
            if (((value >> 15) | (value << 17)) + delta) & mask \
                    != unpack_footer(view, end - FOOTER_SIZE)[0]:
                yield offset, end, FrameProblem(offset, "bad_data", False)
                offset = end
                continue
        yield offset, end, data
        offset = end
