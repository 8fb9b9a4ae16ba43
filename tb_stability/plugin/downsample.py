"""Server-side downsampling for the plugin's `/series` and `/matrix` routes.

Pure numpy, no TensorBoard imports, so it is easy to test on its own.

Series use min/max-preserving buckets (an "M4"-style reduction): the points
are split into equal-count buckets in step order and each bucket keeps its
first point, its last point, the point with the smallest finite value, the
point with the largest finite value, and the first NaN, +inf and -inf it
holds. A spike is the maximum of its bucket so it is always kept; the first
non-finite value of every bucket is kept; the last point of the series is
the last point of the last bucket so it is always kept.

Matrices (layer x step) are reduced along the step axis to at most
`max_steps` columns; each column covers a contiguous range of logged steps
and holds, per layer, the largest finite value in that range (or the
non-finite value if any value in the range is non-finite: NaN wins over
+inf over -inf). Layers are never merged: at most `max_names` are kept,
in their logged order, and the answer says how many there were.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# At most this many points per bucket survive in `downsample_series`.
_KEEP_PER_BUCKET = 7
DEFAULT_MAX_POINTS = 2000
DEFAULT_MAX_STEPS = 400
DEFAULT_MAX_NAMES = 256


def json_number(value: float) -> Any:
    """A JSON-safe number: non-finite floats become ``"nan"``/``"inf"``/``"-inf"``.

    The same spelling as `tb_stability.findings.Finding.to_json`.
    """
    value = float(value)
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"


def series_indices(values: np.ndarray, max_points: int = DEFAULT_MAX_POINTS) -> np.ndarray:
    """Indices of the points that `downsample_series` keeps.

    Args:
      values: 1-D float array in step order.
      max_points: Upper bound on the number of indices returned (>= 7).

    Returns:
      Sorted unique int64 indices into ``values``; all of them when
      ``len(values) <= max_points``.
    """
    n = int(values.shape[0])
    if n <= max_points:
        return np.arange(n, dtype=np.int64)
    if max_points < _KEEP_PER_BUCKET:
        raise ValueError(f"max_points must be >= {_KEEP_PER_BUCKET}")
    buckets = max_points // _KEEP_PER_BUCKET
    edges = np.linspace(0, n, buckets + 1).astype(np.int64)
    keep: list[int] = []
    finite = np.isfinite(values)
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi <= lo:
            continue
        keep.append(int(lo))
        keep.append(int(hi) - 1)
        chunk = values[lo:hi]
        chunk_finite = finite[lo:hi]
        if chunk_finite.any():
            masked = np.where(chunk_finite, chunk, np.nan)
            keep.append(int(lo) + int(np.nanargmin(masked)))
            keep.append(int(lo) + int(np.nanargmax(masked)))
        if not chunk_finite.all():
            for mask in (np.isnan(chunk), chunk == np.inf, chunk == -np.inf):
                hits = np.flatnonzero(mask)
                if hits.size:
                    keep.append(int(lo) + int(hits[0]))
    return np.unique(np.asarray(keep, dtype=np.int64))


def downsample_series(
    steps: np.ndarray, values: np.ndarray, max_points: int = DEFAULT_MAX_POINTS
) -> dict[str, Any]:
    """Downsamples one scalar series for the `/series` route.

    Args:
      steps: int step array ``[T]``, sorted.
      values: float array ``[T]``.
      max_points: Upper bound on the points returned.

    Returns:
      ``{"steps", "values", "total_points", "downsampled", "nonfinite"}`` where
      ``values`` uses `json_number` and ``nonfinite`` lists the steps (of the
      kept points) whose value is not finite.
    """
    steps = np.asarray(steps, dtype=np.int64).reshape(-1)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if steps.shape != values.shape:
        raise ValueError("steps and values must have the same length")
    idx = series_indices(values, max_points)
    kept_steps = steps[idx]
    kept_values = values[idx]
    return {
        "steps": [int(s) for s in kept_steps],
        "values": [json_number(v) for v in kept_values],
        "total_points": int(values.shape[0]),
        "downsampled": bool(idx.shape[0] < values.shape[0]),
        "nonfinite": [int(s) for s, v in zip(kept_steps, kept_values) if not math.isfinite(v)],
    }


def _reduce_block(block: np.ndarray, missing: np.ndarray | None = None) -> np.ndarray:
    """Per column: largest finite value, or the worst non-finite value.

    Entries marked ``missing`` (not recorded) are left out; a column with
    nothing recorded in the block is NaN (`downsample_matrix` sends it as null).
    """
    recorded = np.ones(block.shape, bool) if missing is None else ~missing
    with np.errstate(all="ignore"):
        finite = np.isfinite(block) & recorded
        out = np.where(finite, block, -np.inf).max(axis=0)
        out = np.where(finite.any(axis=0), out, np.nan)
        out = np.where(((block == -np.inf) & recorded).any(axis=0), -np.inf, out)
        out = np.where(((block == np.inf) & recorded).any(axis=0), np.inf, out)
        out = np.where((np.isnan(block) & recorded).any(axis=0), np.nan, out)
    return out


def downsample_matrix(
    steps: np.ndarray,
    names: tuple[str, ...] | list[str],
    values: np.ndarray,
    max_steps: int = DEFAULT_MAX_STEPS,
    max_names: int = DEFAULT_MAX_NAMES,
    missing: np.ndarray | None = None,
) -> dict[str, Any]:
    """Downsamples a layer x step matrix for the `/matrix` route.

    Args:
      steps: int step array ``[T]``, sorted.
      names: ``N`` layer or variable names.
      values: float array ``[T, N]``.
      max_steps: Upper bound on the number of step columns returned.
      max_names: Upper bound on the number of names (rows) returned.
      missing: Optional bool ``[T, N]``: entries no record held (`Matrix.missing`).

    Returns:
      ``{"names", "steps", "step_ends", "values", "total_steps",
      "total_names", "downsampled", "truncated_names"}``; ``values[i][j]`` is
      name ``j`` over logged steps ``steps[i]..step_ends[i]`` (`json_number`),
      or null where none of those records held it.
    """
    steps = np.asarray(steps, dtype=np.int64).reshape(-1)
    values = np.asarray(values, dtype=np.float64)
    names = list(names)
    if values.ndim != 2 or values.shape[0] != steps.shape[0]:
        raise ValueError("values must be [len(steps), len(names)]")
    total_steps, total_names = int(values.shape[0]), int(values.shape[1])
    if missing is not None:
        missing = np.asarray(missing, bool)
    if total_names > max_names:
        values = values[:, :max_names]
        missing = missing[:, :max_names] if missing is not None else None
    names = names[: values.shape[1]]
    if total_steps <= max_steps:
        starts, ends, reduced, absent = steps, steps, values, missing
    else:
        edges = np.linspace(0, total_steps, max_steps + 1).astype(np.int64)
        pairs = [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
        starts = np.array([steps[lo] for lo, _ in pairs], dtype=np.int64)
        ends = np.array([steps[hi - 1] for _, hi in pairs], dtype=np.int64)
        reduced = np.stack([_reduce_block(values[lo:hi], None if missing is None else missing[lo:hi])
                            for lo, hi in pairs])
        absent = None if missing is None else np.stack([missing[lo:hi].all(axis=0)
                                                        for lo, hi in pairs])
    if absent is None:
        rows = [[json_number(v) for v in row] for row in reduced]
    else:
        rows = [[None if gone else json_number(v) for v, gone in zip(row, gaps)]
                for row, gaps in zip(reduced, absent)]
    return {
        "names": names,
        "steps": [int(s) for s in starts],
        "step_ends": [int(s) for s in ends],
        "values": rows,
        "total_steps": total_steps,
        "total_names": total_names,
        "downsampled": bool(len(starts) < total_steps),
        "truncated_names": bool(total_names > len(names)),
    }
