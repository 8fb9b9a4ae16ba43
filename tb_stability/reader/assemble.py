"""Turns the raw records of a run's event files into a `RunData`.

Records from all files of a run are concatenated in file-name order (event
file names start with a timestamp) and record order, sorted by step, and
duplicate steps are dropped keeping the last write.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tb_stability import schema
from tb_stability.reader.decode import FileState
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


def build_run(name: str, states: Sequence[FileState]) -> RunData:
    """Builds the `RunData` of one run from its files' states (in file order)."""
    run = RunData(name=name)
    for state in states:
        run.warnings.extend(state.all_warnings())
    run.steps = _build_steps([b for s in states for b in s.blocks])
    tensors: dict[str, list] = {}
    for state in states:
        for tag, records in state.tensors.items():
            tensors.setdefault(tag, []).extend(records)
    for tag, records in sorted(tensors.items()):
        try:
            _place_tensor(run, tag, records)
        except ValueError as error:
            run.warnings.append(f"tag {tag!r}: {error}; skipped the tag")
    scalars: dict[str, tuple[list, list]] = {}
    for state in states:
        for tag, (steps, values) in state.scalars.items():
            entry = scalars.setdefault(tag, ([], []))
            entry[0].extend(steps)
            entry[1].extend(values)
    for tag, (steps, values) in sorted(scalars.items()):
        run.scalars[tag] = _series(np.asarray(steps, dtype=np.int64),
                                   np.asarray(values, dtype=np.float64))
    json_records: dict[str, list] = {}
    for state in states:
        for tag, records in state.json.items():
            json_records.setdefault(tag, []).extend(records)
    for tag, records in sorted(json_records.items()):
        order = last_wins(np.asarray([step for step, _ in records], dtype=np.int64))
        run.json[tag] = [records[i] for i in order]
    return run


def _series(steps: np.ndarray, values: np.ndarray) -> Series:
    order = last_wins(steps)
    return Series(steps=steps[order], values=values[order])


def _build_steps(blocks: list) -> dict[str, Series]:
    """Expands ``stability/steps`` blocks into one `Series` per column."""
    if not blocks:
        return {}
    columns: dict[str, tuple[list, list]] = {}
    for event_step, names, array in blocks:
        array = np.asarray(array, dtype=np.float64)
        if "step" in names:
            steps = array[:, names.index("step")]
            finite = np.isfinite(steps)
            if not finite.all():
                array, steps = array[finite], steps[finite]
            steps = steps.astype(np.int64)
        else:
            count = array.shape[0]
            steps = np.arange(event_step - count + 1, event_step + 1, dtype=np.int64)
        for j, column in enumerate(names):
            if column == "step":
                continue
            entry = columns.setdefault(column, ([], []))
            entry[0].append(steps)
            entry[1].append(array[:, j])
    result = {}
    for column, (steps, values) in columns.items():
        result[column] = _series(np.concatenate(steps), np.concatenate(values))
    return result


def _matrix(records: list, names_of=lambda content: content.names) -> Matrix:
    """Stacks (step, content, vector) records into a `Matrix`, sorted, last wins.

    When the names change over time (a model grew a layer) the matrix holds the
    union of names in order of first appearance, NaN where a name is missing.
    """
    steps = np.asarray([r[0] for r in records], dtype=np.int64)
    name_lists = [tuple(names_of(r[1])) for r in records]
    vectors = [np.asarray(r[2], dtype=np.float64).reshape(-1) for r in records]
    for names, vector in zip(name_lists, vectors):
        if names and len(names) != vector.size:
            raise ValueError(f"{vector.size} values for {len(names)} names")
    first = name_lists[0]
    if all(n == first for n in name_lists) and len({v.size for v in vectors}) == 1:
        names = first or tuple(str(i) for i in range(vectors[0].size))
        values = np.stack(vectors) if vectors else np.zeros((0, len(names)))
    else:
        index: dict[str, int] = {}
        for names, vector in zip(name_lists, vectors):
            for name in names or (str(i) for i in range(vector.size)):
                index.setdefault(name, len(index))
        values = np.full((len(vectors), len(index)), np.nan)
        for i, (names, vector) in enumerate(zip(name_lists, vectors)):
            names = names or tuple(str(k) for k in range(vector.size))
            values[i, [index[n] for n in names]] = vector
        names = tuple(index)
    order = last_wins(steps)
    return Matrix(steps=steps[order], names=tuple(names), values=values[order])


def _place_tensor(run: RunData, tag: str, records: list) -> None:
    if tag.startswith(_VAR_PREFIX):
        run.variables[tag[len(_VAR_PREFIX):]] = _matrix(records)
    elif tag.startswith(_LAYER_PREFIX):
        run.layers[tag[len(_LAYER_PREFIX):]] = _matrix(records)
    elif tag == schema.TAG_LABELS:
        run.labels = _matrix(records)
    elif tag == schema.TAG_PREDICTIONS:
        run.predictions = _matrix(records)
    elif tag == schema.TAG_INPUTS:
        _place_inputs(run, records)
    # Other stability tags are from a newer writer: ignored (forward compatible).


def _place_inputs(run: RunData, records: list) -> None:
    per_row: dict[str, list] = {}
    for step, content, array in records:
        array = np.asarray(array, dtype=np.float64)
        if array.ndim != 2:
            raise ValueError(f"inputs tensor must be 2-D, got shape {array.shape}")
        rows = content.rows or schema.INPUT_ROWS[: array.shape[0]]
        if len(rows) != array.shape[0]:
            raise ValueError(f"{array.shape[0]} input rows for {len(rows)} row names")
        for i, row in enumerate(rows):
            per_row.setdefault(row, []).append((step, content, array[i]))
    for row, row_records in per_row.items():
        run.inputs[row] = _matrix(row_records)
