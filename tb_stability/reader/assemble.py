"""Turns the segments of a run's event files into a `RunData`.

Records from all files of a run are concatenated in the order the files were
written (`tb_stability.reader.file_order`: their names start with a
timestamp and a counter) and record order, sorted by step, and
duplicate steps are dropped keeping the last write. Before that, an earlier
file's points that a later file's restarted training replaces are left out
(`restarts`).

When a quantity comes from a single segment whose steps already increase
strictly (the usual case: one file per run, written in order), the `RunData`
arrays are the cached segment arrays themselves (read-only views, no copy),
and every per-step column of a block shares one steps array.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from tb_stability import schema
from tb_stability.reader import hparams, keras_model, restarts
from tb_stability.reader.decode import FileState
from tb_stability.reader.segments import Segment, read_only
from tb_stability.rundata import Matrix, RunData, Series

_VAR_PREFIX = schema.TAG_PREFIX + "var/"
_LAYER_PREFIX = schema.TAG_PREFIX + "layer/"


def last_wins(steps: np.ndarray) -> np.ndarray:
    """Indices that sort ``steps`` and keep the last occurrence of each step."""
    steps = np.asarray(steps)
    if steps.size == 0:
        return np.zeros(0, dtype=np.int64)
    reversed_steps = steps[::-1]
    _, first_in_reversed = np.unique(reversed_steps, return_index=True)
    return (steps.size - 1 - first_in_reversed).astype(np.int64)


def _increasing(steps: np.ndarray) -> bool:
    return steps.shape[0] < 2 or bool((steps[1:] > steps[:-1]).all())


class _Steps:
    """Concatenated, sorted steps shared by the quantities built from the same pieces."""

    def __init__(self):
        self._cache: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray | None]] = {}
        self._keep: list = []  # keeps the pieces alive so their ids stay unique

    def order(self, pieces: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """``(sorted unique steps, order)``; ``order`` is None when already sorted."""
        key = tuple(id(p) for p in pieces)
        found = self._cache.get(key)
        if found is None:
            self._keep.append(pieces)
            steps = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
            if _increasing(steps):
                found = (read_only(steps), None)
            else:
                order = last_wins(steps)
                found = (read_only(steps[order]), order)
            self._cache[key] = found
        return found


def _take(values: list[np.ndarray], order, axis: int = 0) -> np.ndarray:
    array = values[0] if len(values) == 1 else np.concatenate(values, axis=axis)
    if order is not None:
        array = np.take(array, order, axis=axis)
    return read_only(array)


def _merged(files: list[restarts.FileData], kind: str) -> list[tuple[str, list]]:
    """``(tag, items)`` of one kind over all files, in file order, sorted by tag."""
    merged: dict[str, list] = {}
    for data in files:
        for tag, items in data.tables[kind].items():
            merged.setdefault(tag, []).extend(items)
    return sorted(((tag, items) for tag, items in merged.items() if items), key=lambda e: e[0])


def build_run(name: str, states: Sequence[FileState]) -> RunData:
    """Builds the `RunData` of one run from its files' states (in file order).

    What a later file replaces (its training restarted at a step an earlier
    file reached) is left out first, with a warning (`restarts`).
    """
    run = RunData(name=name)
    for state in states:
        run.warnings.extend(state.all_warnings())
    files = restarts.without_orphans(states, run.warnings)
    shared = _Steps()
    run.steps = _build_steps([b for _, blocks in _merged(files, "steps") for b in blocks], shared)
    for tag, segments in _merged(files, "tensors"):
        try:
            _place_tensor(run, tag, segments, shared)
        except ValueError as error:
            run.warnings.append(f"tag {tag!r}: {error}; skipped the tag")
    for tag, segments in _merged(files, "scalars"):
        steps, order = shared.order([s.steps for s in segments])
        run.scalars[tag] = Series(steps=steps, values=_take([s.values for s in segments], order))
    for tag, records in _merged(files, "json"):
        order = last_wins(np.asarray([step for step, _ in records], dtype=np.int64))
        run.json[tag] = [records[i] for i in order]
    for state in states:  # the last file that starts a session (a rerun's) holds the run's
        run.hparams = hparams.session_hparams(state.meta, state.label, run.warnings) or run.hparams
        if state.keras_model is not None:  # likewise the last fit's model
            run.model_config = (keras_model.compiled_model(state.keras_model, state.label,
                                                           run.warnings) or run.model_config)
    return run


def _build_steps(blocks: list[Segment], shared: _Steps) -> dict[str, Series]:
    """Expands ``stability/steps`` segments into one `Series` per column."""
    columns: dict[str, tuple[list, list]] = {}
    for block in blocks:
        for j, column in enumerate(block.key):
            entry = columns.setdefault(column, ([], []))
            entry[0].append(block.steps)
            entry[1].append(block.values[j])
    result = {}
    for column, (steps, values) in columns.items():
        sorted_steps, order = shared.order(steps)
        result[column] = Series(steps=sorted_steps, values=_take(values, order))
    return result


def _vectors(segment: Segment) -> tuple[tuple[str, ...], np.ndarray]:
    """A segment's names and values as ``[n, size]`` (a view)."""
    content, shape = segment.key
    size = math.prod(shape)
    names = content.names
    if names and len(names) != size:
        raise ValueError(f"{size} values for {len(names)} names")
    return names, segment.values.reshape(segment.values.shape[0], size)


def _matrix(segments: list[tuple[tuple[str, ...], np.ndarray, np.ndarray]],
            shared: _Steps) -> Matrix:
    """Stacks (names, steps, [n, size] values) pieces into a `Matrix`, sorted, last wins.

    When the names change over time (a model grew a layer) the matrix holds the
    union of names in order of first appearance, NaN where a name is missing
    (marked in ``missing``, so that it is not read as a non-finite value).
    """
    steps, order = shared.order([s[1] for s in segments])
    first = segments[0][0]
    width = segments[0][2].shape[1]
    if all(s[0] == first and s[2].shape[1] == width for s in segments):
        names = first or tuple(str(i) for i in range(width))
        values = _take([s[2] for s in segments], order)
        return Matrix(steps=steps, names=tuple(names), values=values)
    index: dict[str, int] = {}
    for names, _, vectors in segments:
        for name in names or (str(i) for i in range(vectors.shape[1])):
            index.setdefault(name, len(index))
    total = sum(s[2].shape[0] for s in segments)
    values = np.full((total, len(index)), np.nan)
    missing = np.ones((total, len(index)), bool)
    row = 0
    for names, _, vectors in segments:
        names = names or tuple(str(k) for k in range(vectors.shape[1]))
        count = vectors.shape[0]
        columns = [index[n] for n in names]
        values[row:row + count, columns] = vectors
        missing[row:row + count, columns] = False
        row += count
    return Matrix(steps=steps, names=tuple(index), values=_take([values], order),
                  missing=_take([missing], order))


def _pieces(segments: list[Segment]) -> list:
    return [(names, s.steps, vectors) for s in segments for names, vectors in [_vectors(s)]]


def _place_tensor(run: RunData, tag: str, segments: list[Segment], shared: _Steps) -> None:
    if tag.startswith(_VAR_PREFIX):
        run.variables[tag[len(_VAR_PREFIX):]] = _matrix(_pieces(segments), shared)
    elif tag.startswith(_LAYER_PREFIX):
        run.layers[tag[len(_LAYER_PREFIX):]] = _matrix(_pieces(segments), shared)
    elif tag == schema.TAG_LABELS:
        run.labels = _matrix(_pieces(segments), shared)
    elif tag == schema.TAG_PREDICTIONS:
        run.predictions = _matrix(_pieces(segments), shared)
    elif tag == schema.TAG_INPUTS:
        _place_rows(run.inputs, "inputs", segments, shared)
    elif tag == schema.TAG_TARGETS:
        _place_rows(run.targets, "targets", segments, shared)
    # Other stability tags are from a newer writer: ignored (forward compatible).


def _place_rows(into: dict, what: str, segments: list[Segment], shared: _Steps) -> None:
    """Fills ``into`` (``run.inputs`` or ``run.targets``) with one `Matrix` per statistic row."""
    per_row: dict[str, list] = {}
    for segment in segments:
        content, shape = segment.key
        if len(shape) != 2:
            raise ValueError(f"{what} tensor must be 2-D, got shape {shape}")
        rows = content.rows or schema.INPUT_ROWS[: shape[0]]
        if len(rows) != shape[0]:
            raise ValueError(f"{shape[0]} {what} rows for {len(rows)} row names")
        names = content.names
        if names and len(names) != shape[1]:
            raise ValueError(f"{shape[1]} values for {len(names)} names")
        for i, row in enumerate(rows):
            per_row.setdefault(row, []).append(
                (names, segment.steps, np.ascontiguousarray(segment.values[:, i, :])))
    for row, pieces in per_row.items():
        into[row] = _matrix(pieces, shared)
