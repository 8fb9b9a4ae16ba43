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

import warnings

import numpy as np

MAD_TO_STD = 1.4826
Q99_TO_STD = 2.326
_CHUNK = 4096


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
) -> tuple[np.ndarray, np.ndarray]:
    """Median and tail-aware spread of the ``window`` values *before* each index.

    Row ``i`` summarises ``values[max(0, i - window):i]`` (the current value is
    excluded). Non-finite values inside a window are ignored; where fewer than
    ``min_history`` finite values are available the outputs are NaN.

    Args:
      values: 1-D array.
      window: Number of preceding values considered.
      min_history: Minimum number of finite preceding values.
      rel_floor: Spread floor relative to ``|median|``.
      abs_floor: Absolute spread floor.

    Returns:
      ``(medians, spreads)``, arrays of the same length as ``values``.
    """
    x = np.asarray(values, dtype=np.float64)
    n = x.shape[0]
    med = np.full(n, np.nan)
    spread = np.full(n, np.nan)
    if n == 0 or window < 1:
        return med, spread
    clean = np.where(np.isfinite(x), x, np.nan)
    padded = np.concatenate([np.full(window, np.nan), clean])
    views = np.lib.stride_tricks.sliding_window_view(padded[:-1], window)
    counts = np.lib.stride_tricks.sliding_window_view(
        np.concatenate([np.zeros(window), np.isfinite(x).astype(np.float64)])[:-1], window
    ).sum(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for start in range(0, n, _CHUNK):
            block = views[start:start + _CHUNK]
            m = np.nanmedian(block, axis=1)
            d = np.nanmedian(np.abs(block - m[:, None]), axis=1)
            q = np.nanpercentile(block, 99, axis=1)
            s = np.maximum.reduce([
                MAD_TO_STD * d,
                (q - m) / Q99_TO_STD,
                rel_floor * np.abs(m),
                np.full_like(m, abs_floor),
            ])
            med[start:start + _CHUNK] = m
            spread[start:start + _CHUNK] = s
    ok = counts >= min_history
    med[~ok] = np.nan
    spread[~ok] = np.nan
    return med, spread


def rolling_median(values, k: int) -> np.ndarray:
    """Trailing median over the last ``k`` values including the current one.

    Non-finite values are ignored; the first ``k - 1`` outputs use the shorter
    available prefix. NaN where a window holds no finite value.
    """
    x = np.asarray(values, dtype=np.float64)
    n = x.shape[0]
    if n == 0:
        return np.zeros(0)
    k = max(1, int(k))
    clean = np.where(np.isfinite(x), x, np.nan)
    padded = np.concatenate([np.full(k - 1, np.nan), clean])
    views = np.lib.stride_tricks.sliding_window_view(padded, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(views, axis=1)


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
