"""Compact, per-file storage of decoded records.

While a file is parsed, the records of each tag are appended, as raw bytes,
to *pending runs*: consecutive records sharing a key (metadata, dtype,
shape). After the parse each pending run becomes one `Segment`: a step array
and one float64 array for all its records, so no per-record object survives
the read. Adjacent segments with the same key are merged (`consolidate`)
after a file is read, so a file usually holds one segment per tag however
often it grew.

Segment arrays are read-only: the assembled `RunData` shares them whenever
no sorting or merging is needed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["Pending", "Segment", "consolidate", "read_only", "steps_segment",
           "tensor_segment", "scalar_segment"]


def read_only(array: np.ndarray) -> np.ndarray:
    """Marks ``array`` read-only (shared with the cache) and returns it."""
    array.flags.writeable = False
    return array


@dataclasses.dataclass
class Segment:
    """Consecutive records of one tag in one file.

    Attributes:
      key: What records must share to be merged: column names for step
        blocks, ``(Content, shape)`` for stability tensors, None for scalars.
      steps: int64 ``[n]``, in record order (not sorted, may repeat).
      values: float64. Step blocks: ``[columns, n]`` (one contiguous row per
        column); tensors: ``[n, *shape]``; scalars: ``[n]``.
      axis: The axis of ``values`` along which records follow each other.
    """

    key: Any
    steps: np.ndarray
    values: np.ndarray
    axis: int = 0


class Pending:
    """Raw records of one tag sharing one key, before conversion to a `Segment`.

    Attributes:
      key: ``(Content, numpy dtype, shape)``.
      steps: Event steps, one per record.
      data: The records' tensor bytes, concatenated.
      match: ``(Content, dtype code, serialized shape, byte length)`` a record
        must have to be appended without further checks (None: always check).
    """

    __slots__ = ("key", "steps", "data", "match")

    def __init__(self, key):
        self.key = key
        self.match = None
        self.steps: list[int] = []
        self.data = bytearray()


def tensor_segment(pending: Pending) -> Segment:
    """Converts the pending records of a stability tensor tag to a `Segment`."""
    content, dtype, shape = pending.key
    count = len(pending.steps)
    values = np.frombuffer(pending.data, dtype=dtype).reshape((count,) + tuple(shape))
    values = values.astype(np.float64)  # always a copy: the bytearray can go
    steps = np.array(pending.steps, dtype=np.int64)
    return Segment((content, tuple(shape)), read_only(steps), read_only(values), 0)


def steps_segment(pending: Pending) -> Segment | None:
    """Converts pending ``stability/steps`` blocks to a column-major `Segment`.

    The ``"step"`` column, when present, gives each row's step (rows whose
    step is not finite are dropped); otherwise a block of ``k`` rows ends at
    its event's step.
    """
    content, dtype, shape = pending.key
    rows, width = shape
    names = content.names
    count = len(pending.steps)
    table = np.frombuffer(pending.data, dtype=dtype).reshape(count * rows, width)
    keep = [j for j, name in enumerate(names) if name != "step"]
    if "step" in names:
        steps = table[:, names.index("step")].astype(np.float64)
        finite = np.isfinite(steps)
        if not finite.all():
            table, steps = table[finite], steps[finite]
        steps = steps.astype(np.int64)
    else:
        ends = np.array(pending.steps, dtype=np.int64)
        steps = (ends[:, None] + np.arange(1 - rows, 1, dtype=np.int64)[None, :]).reshape(-1)
    values = np.empty((len(keep), steps.shape[0]), dtype=np.float64)
    for i, j in enumerate(keep):
        values[i] = table[:, j]
    return Segment(tuple(names[j] for j in keep), read_only(steps), read_only(values), 1)


def scalar_segment(steps: list, values: list) -> Segment:
    """Converts pending scalar points to a `Segment`."""
    return Segment(None, read_only(np.array(steps, dtype=np.int64)),
                   read_only(np.array(values, dtype=np.float64)), 0)


def consolidate(segments: list[Segment]) -> list[Segment]:
    """Merges adjacent segments with equal keys (one copy per merged group)."""
    if len(segments) < 2:
        return segments
    groups: list[list[Segment]] = [[segments[0]]]
    for segment in segments[1:]:
        last = groups[-1][0]
        if segment.key == last.key and segment.axis == last.axis \
                and segment.values.shape[:segment.axis] == last.values.shape[:last.axis]:
            groups[-1].append(segment)
        else:
            groups.append([segment])
    merged = []
    for group in groups:
        if len(group) == 1:
            merged.append(group[0])
            continue
        first = group[0]
        steps = np.concatenate([s.steps for s in group])
        values = np.concatenate([s.values for s in group], axis=first.axis)
        merged.append(Segment(first.key, read_only(steps), read_only(values), first.axis))
    return merged
