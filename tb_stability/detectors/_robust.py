"""Robust statistics shared by the detectors (pure numpy, no TensorFlow).

Everything here works on 1-D float arrays and ignores nothing silently:
functions that skip non-finite values say so in their docstring.

The spread estimate used for spike-like tests is *tail aware*:
``max(1.4826 * MAD, (q99 - median) / 2.326, rel_floor * |median|, abs_floor)``.
For Gaussian noise both terms estimate the standard deviation; for the
right-skewed, heteroscedastic per-batch losses of real training (e.g. a
smaller last batch every epoch) the quantile term widens the band so that
ordinary batch noise does not read as a spike.
"""

from __future__ import annotations

import numpy as np

from tb_stability.detectors import _windows as W

MAD_TO_STD = 1.4826
Q99_TO_STD = 2.326
_DIRECT_MAX = 48


def median(values) -> float:
    """Median of the finite values (NaN when there are none)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else float("nan")


def mad(values) -> float:
    """Median absolute deviation of the finite values (unscaled)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if not x.size:
        return float("nan")
    return float(np.median(np.abs(x - np.median(x))))


def robust_std(values, rel_floor: float = 1e-3, abs_floor: float = 1e-12) -> float:
    """Tail-aware robust spread of the finite values (see module docstring)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if not x.size:
        return float("nan")
    med = float(np.median(x))
    spread = max(
        MAD_TO_STD * float(np.median(np.abs(x - med))),
        (float(np.percentile(x, 99)) - med) / Q99_TO_STD,
        rel_floor * abs(med),
        abs_floor,
    )
    return spread


def trailing_stats(
    values,
    window: int,
    min_history: int,
    rel_floor: float = 1e-3,
    abs_floor: float = 1e-12,
    where=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Median and tail-aware spread of the ``window`` values *before* each index.

    Row ``i`` summarises ``values[max(0, i - window):i]`` (the current value is
    excluded). Non-finite values inside a window are ignored; where fewer than
    ``min_history`` finite values are available the outputs are NaN. The
    numbers are exactly ``np.nanmedian`` / ``np.nanpercentile`` over each
    window, computed in O(n log n) for the medians (`_windows.RangeOrder`).

    Args:
      values: 1-D array.
      window: Number of preceding values considered.
      min_history: Minimum number of finite preceding values.
      rel_floor: Spread floor relative to ``|median|``.
      abs_floor: Absolute spread floor.
      where: Optional boolean mask: the spread is computed only where it is
        True (NaN elsewhere); the medians are always complete.

    Returns:
      ``(medians, spreads)``, arrays of the same length as ``values``.
    """
    x = np.asarray(values, dtype=np.float64)
    n = x.shape[0]
    med = np.full(n, np.nan)
    spread = np.full(n, np.nan)
    if n == 0 or window < 1:
        return med, spread
    order = W.RangeOrder(x)
    idx = np.arange(n)
    lo, hi = np.maximum(0, idx - window), idx
    ok = order.count(lo, hi) >= min_history
    rows = np.flatnonzero(ok)
    med[rows] = order.median(lo[rows], hi[rows], window)
    if where is not None:
        rows = np.flatnonzero(ok & np.asarray(where, dtype=bool))
    spread[rows] = trailing_spread(x, window, med, rows, rel_floor, abs_floor)
    return med, spread


def trailing_spread(values, window: int, med, rows, rel_floor: float = 1e-3,
                    abs_floor: float = 1e-12) -> np.ndarray:
    """Tail-aware spread of the windows of `trailing_stats` at ``rows`` only.

    Args:
      values: 1-D array.
      window: Number of preceding values considered.
      med: The window medians (from `trailing_stats`), indexed by row.
      rows: Row indices to compute.

    Returns:
      The spreads at ``rows`` (NaN where a window holds no finite value).
    """
    rows = np.asarray(rows, dtype=np.int64)
    med = np.asarray(med, dtype=np.float64)
    out = np.full(rows.size, np.nan)
    for start, block, c in W.sorted_rows(values, window, rows):
        m = med[rows[start:start + block.shape[0]]]
        d = W.middle(np.sort(np.abs(block - m[:, None]), axis=1), c, window)
        q = W.percentile_of(block, c, 99)
        with np.errstate(invalid="ignore", over="ignore"):
            s = np.maximum.reduce([
                MAD_TO_STD * d,
                (q - m) / Q99_TO_STD,
                rel_floor * np.abs(m),
                np.full_like(m, abs_floor),
            ])
        out[start:start + block.shape[0]] = np.where(c > 0, s, np.nan)
    return out


def rolling_median(values, k: int) -> np.ndarray:
    """Trailing median over the last ``k`` values including the current one.

    Non-finite values are ignored; the first ``k - 1`` outputs use the shorter
    available prefix. NaN where a window holds no finite value. Exactly
    ``np.nanmedian`` over each window, in O(n log n) (`_windows.RangeOrder`).
    """
    x = np.asarray(values, dtype=np.float64)
    n = x.shape[0]
    if n == 0:
        return np.zeros(0)
    k = max(1, int(k))
    if k <= _DIRECT_MAX:  # short windows: sorting every window is cheaper
        out = np.empty(n)
        for start, block, c in W.sorted_rows(x, k, trailing=False):
            out[start:start + block.shape[0]] = W.middle(block, c, k)
        return out
    idx = np.arange(n)
    return W.RangeOrder(x).median(np.maximum(0, idx - k + 1), idx + 1, k)


def true_runs(mask) -> list[tuple[int, int]]:
    """Maximal runs of True as inclusive ``(start, end)`` index pairs."""
    m = np.asarray(mask, dtype=bool)
    if not m.size:
        return []
    edges = np.diff(np.concatenate([[0], m.astype(np.int8), [0]]))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1) - 1
    return [(int(s), int(e)) for s, e in zip(starts, ends)]


def first_index(mask) -> int | None:
    """Index of the first True, or None."""
    idx = np.flatnonzero(np.asarray(mask, dtype=bool))
    return int(idx[0]) if idx.size else None


def last_index(mask) -> int | None:
    """Index of the last True, or None."""
    idx = np.flatnonzero(np.asarray(mask, dtype=bool))
    return int(idx[-1]) if idx.size else None


def level(values, fraction: float = 0.1, minimum: int = 3, at_end: bool = False) -> float:
    """Robust level (median) of the first or last ``fraction`` of the finite values."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if not x.size:
        return float("nan")
    k = min(x.size, max(minimum, int(round(fraction * x.size))))
    part = x[-k:] if at_end else x[:k]
    return float(np.median(part))


def autocorr(values, lag: int) -> float:
    """Sample autocorrelation at ``lag`` (NaN when undefined)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if lag < 1 or x.size <= lag + 1:
        return float("nan")
    x = x - x.mean()
    denom = float(np.dot(x, x))
    if denom <= 0:
        return float("nan")
    return float(np.dot(x[:-lag], x[lag:]) / denom)


SECOND_DIFF_TO_STD = 1.652  # median |a - 2b + c| of iid N(0, s^2) is 0.6745 * sqrt(6) * s


def log_noise(values, minimum: int = 8) -> float:
    """Point-to-point noise of a positive series, in log units (NaN with < ``minimum`` points).

    The robust standard deviation of ``log(x)`` around its local trend: the
    median absolute second difference of ``log(x)`` over 1.652, so a steady
    exponential rise or fall (a constant first difference) adds nothing.
    Non-finite and non-positive values are skipped. About 0.1-0.3 for the
    per-batch loss of batches of 32-64; about 2 for the per-sample squared
    error of ``batch_size=1``.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x) & (x > 0)]
    if x.size < max(3, minimum):
        return float("nan")
    return float(np.median(np.abs(np.diff(np.log(x), 2)))) / SECOND_DIFF_TO_STD


def noise_bound(sigma: float, z: float, points: int = 1) -> float:
    """The largest ratio between two levels that a series' own noise explains.

    ``exp(z * s)`` with ``s`` the log-space spread of a median of ``points``
    values of a series whose `log_noise` is ``sigma`` (``sigma`` x 1.253 /
    sqrt(points); 1.253 is the efficiency loss of a median). 1.0 where the
    noise could not be estimated (``sigma`` NaN).
    """
    if not np.isfinite(sigma):
        return 1.0
    spread = sigma if points <= 1 else 1.253 * sigma / np.sqrt(points)
    return float(np.exp(z * spread))


def median_window(sigma: float, spread: float) -> int:
    """How many points a median needs to scatter by ``spread`` in log units, in a series whose
    `log_noise` is ``sigma``.

    ``(1.253 * sigma / spread) ** 2``, rounded up; 1 where the noise could not
    be estimated (``sigma`` NaN).
    """
    if not np.isfinite(sigma):
        return 1
    return int(np.ceil((1.253 * sigma / spread) ** 2))
