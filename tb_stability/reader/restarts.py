"""Orphaned points: what a later event file of a run replaces.

Each training writes a new event file into its run directory. When a later
file logs a quantity from a step that an earlier file already reached, the
training behind it restarted there: a rerun into the same directory (steps
from 0 again, a notebook cell run twice), a resume from a checkpoint (steps
from the checkpoint's), or a second ``model.fit`` under Keras' TensorBoard
callback (its batch counter restarts at every fit). The earlier file's points
at or after that step belong to a training that no longer leads to the
later one, so they are left out, quantity by quantity, with a run warning:
the same rule as TensorBoard's purge of orphaned data, which TensorBoard
itself applies only when a file marks its start with a session log (TF2
writers do not). Without it the run would be a splice of two trainings, the
earlier one's tail after the later one's end, and the detectors would read
the seam as a spike or a divergence.

Within one file, points are kept as written and sorted by step (the last
write of a step wins): a file is one training.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from tb_stability.reader.segments import Segment


@dataclasses.dataclass
class FileData:
    """One file's records, trimmed of what later files replace.

    Attributes:
      label: How warnings name the file.
      tables: kind -> tag -> items: ``"steps"`` (``{"": blocks}``),
        ``"tensors"`` and ``"scalars"`` hold `Segment` lists, ``"json"``
        ``(step, record)`` lists.
    """

    label: str
    tables: dict[str, dict[str, list]]


def _segments_range(segments: list[Segment]) -> tuple[int, int] | None:
    steps = [s.steps for s in segments if s.steps.size]
    if not steps:
        return None
    return min(int(s.min()) for s in steps), max(int(s.max()) for s in steps)


def _records_range(records: list[tuple[int, Any]]) -> tuple[int, int] | None:
    if not records:
        return None
    steps = [step for step, _ in records]
    return min(steps), max(steps)


def _trim_segments(segments: list[Segment], cutoff: int) -> tuple[list[Segment], int]:
    out, dropped = [], 0
    for segment in segments:
        keep = segment.steps < cutoff
        if keep.all():
            out.append(segment)
            continue
        dropped += int(keep.size - keep.sum())
        if keep.any():
            out.append(Segment(key=segment.key, steps=segment.steps[keep],
                               values=np.compress(keep, segment.values, axis=segment.axis),
                               axis=segment.axis))
    return out, dropped


def _trim_records(records, cutoff: int):
    kept = [r for r in records if r[0] < cutoff]
    return kept, len(records) - len(kept)


def _file_data(state) -> FileData:
    return FileData(state.label, {"steps": {"": list(state.blocks)} if state.blocks else {},
                                  "tensors": dict(state.tensors), "scalars": dict(state.scalars),
                                  "json": dict(state.json)})


def without_orphans(states: Sequence[Any], warnings: list[str]) -> list[FileData]:
    """The files' records (in file order) without the points later files replace.

    Args:
      states: The run's `decode.FileState` objects, in file order (oldest
        first). They are not changed.
      warnings: Gets one line per file that lost points, naming it, the
        later file and the step the training restarted from.

    Returns:
      One `FileData` per state, in the same order.
    """
    files = [_file_data(s) for s in states]
    if len(files) < 2:
        return files
    # (kind, tag) -> (the lowest step any later file logs it at, that file's index)
    later_start: dict[tuple[str, str], tuple[int, int]] = {}
    for index in range(len(files) - 1, -1, -1):
        dropped, restart, by = 0, math.inf, None
        for kind, table in files[index].tables.items():
            span_of, trim = ((_records_range, _trim_records) if kind == "json"
                             else (_segments_range, _trim_segments))
            for tag, items in list(table.items()):
                span = span_of(items)
                if span is None:
                    continue
                start = later_start.get((kind, tag))
                if start is not None and span[1] >= start[0]:
                    table[tag], count = trim(items, start[0])
                    dropped += count
                    if start[0] < restart:
                        restart, by = start[0], start[1]
                if start is None or span[0] <= start[0]:
                    later_start[(kind, tag)] = (span[0], index)
        if dropped:
            warnings.append(
                f"{files[index].label}: {dropped} point(s) from step {restart} on were left out: "
                f"the later event file {files[by].label} logs the same quantities from step "
                f"{restart} again (the training was rerun or resumed into this directory); only "
                "the later training is read")
    return files
