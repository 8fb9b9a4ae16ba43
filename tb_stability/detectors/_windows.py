"""Exact, vectorised order statistics over sliding windows (pure numpy).

`_robust.rolling_median` and `_robust.trailing_stats` are defined as numpy's
``nanmedian`` / ``nanpercentile`` over each window; this module computes the
same numbers without materialising one sorted copy per window:

* `RangeOrder` answers "k-th smallest finite value of ``values[lo:hi]``" for
  many ranges at once with a wavelet matrix over the value ranks: O(n log n)
  to build, O(log n) numpy operations per batch of queries, so a rolling
  median over n points costs O(n log n) whatever the window.
* `sorted_rows` gathers selected windows as rows sorted ascending with NaN
  last (in bounded chunks), for statistics that need a whole window (the MAD).

Results are bit-identical to numpy's: `median_of` reproduces how
``np.nanmedian`` combines the two middle values (the masked-array path for
windows shorter than 600, ``np.median`` beyond) and `percentile_of` numpy's
``linear`` interpolation.
"""

from __future__ import annotations

import numpy as np

# np.nanmedian along an axis uses masked arrays below this length, np.median above.
NANMEDIAN_SMALL = 600
_CHUNK_ELEMENTS = 1 << 22


class RangeOrder:
    """k-th smallest finite value of index ranges of one 1-D array.

    Non-finite values are ignored (ranked after every finite value).

    Args:
      values: 1-D array.
    """

    def __init__(self, values):
        x = np.asarray(values, dtype=np.float64)
        n = x.shape[0]
        finite = np.isfinite(x)
        self.n = n
        self.itype = itype = np.int32 if n < 2 ** 30 else np.int64
        self.finite_prefix = np.zeros(n + 1, dtype=itype)
        np.cumsum(finite, out=self.finite_prefix[1:])
        # Ties may take their ranks in any order: only values are returned.
        order = np.argsort(np.where(finite, x, np.nan))  # NaN (non-finite) last
        self.sorted = x[order]
        cur = np.empty(n, dtype=itype)
        cur[order] = np.arange(n, dtype=itype)
        idx = np.arange(n, dtype=itype)
        self.levels = []
        for bit in reversed(range(max(1, int(n - 1).bit_length()))):
            ones = (cur >> bit) & 1
            zeros_prefix = np.zeros(n + 1, dtype=itype)
            np.cumsum(1 - ones, out=zeros_prefix[1:])
            total = itype(zeros_prefix[-1])
            self.levels.append((bit, zeros_prefix, total))
            before = zeros_prefix[:-1]
            dest = before + ones * (total + idx - 2 * before)  # stable partition
            nxt = np.empty_like(cur)
            nxt[dest] = cur
            cur = nxt

    def count(self, lo, hi) -> np.ndarray:
        """Number of finite values in each ``values[lo:hi]``."""
        return self.finite_prefix[hi] - self.finite_prefix[lo]

    def kth(self, lo, hi, k) -> np.ndarray:
        """The ``k``-th smallest (0-based) value of each ``values[lo:hi]``.

        Meaningful only where ``k < count(lo, hi)`` (then the value is finite);
        elsewhere the result is arbitrary.
        """
        it = self.itype
        lo = np.asarray(lo).astype(it)
        hi = np.asarray(hi).astype(it)
        k = np.asarray(k).astype(it)
        if not self.n:
            return np.full(lo.shape, np.nan)
        rank = np.zeros(lo.shape, dtype=it)
        for bit, zeros_prefix, total in self.levels:
            zl = zeros_prefix[lo]
            zh = zeros_prefix[hi]
            zeros = zh - zl
            right = (k >= zeros).astype(it)
            k -= zeros * right
            lo = zl + right * (total + lo - 2 * zl)
            hi = zh + right * (total + hi - 2 * zh)
            rank |= right << bit
        return self.sorted[np.minimum(rank, self.n - 1)]

    def median(self, lo, hi, window: int) -> np.ndarray:
        """``np.nanmedian`` of each ``values[lo:hi]`` computed over rows of ``window`` columns."""
        lo = np.asarray(lo, dtype=np.int64)
        hi = np.asarray(hi, dtype=np.int64)
        c = self.count(lo, hi)
        ok = c > 0
        low = self.kth(lo, hi, np.where(ok, (c - 1) // 2, 0))
        high = low.copy()
        even = ok & (c % 2 == 0)
        if even.any():
            high[even] = self.kth(lo[even], hi[even], c[even] // 2)
        return median_of(low, high, c, window)


def median_of(low, high, counts, window: int) -> np.ndarray:
    """Combines the middle values as ``np.nanmedian`` does over ``window`` columns.

    Args:
      low: Element ``(c - 1) // 2`` of each sorted finite window.
      high: Element ``c // 2``.
      counts: ``c``, the number of finite values (NaN where 0).
      window: The row length numpy would see (selects its code path).
    """
    low = np.asarray(low, dtype=np.float64)
    high = np.asarray(high, dtype=np.float64)
    counts = np.asarray(counts)
    with np.errstate(over="ignore", invalid="ignore"):
        both = (low + high) / 2.0
    if window >= NANMEDIAN_SMALL:
        out = np.where(counts % 2 == 1, high, both)
    else:
        out = both  # the masked-array median always averages (odd: high + high)
    return np.where(counts > 0, out, np.nan)


def percentile_of(rows, counts, q: float) -> np.ndarray:
    """``np.nanpercentile(row, q)`` (linear) of rows sorted ascending with NaN last.

    Args:
      rows: 2-D array, each row sorted with its ``counts`` finite values first.
      counts: Number of finite values per row (result NaN where 0).
      q: Percentile in [0, 100].
    """
    c = np.asarray(counts, dtype=np.int64)
    quantile = np.true_divide(q, 100)
    virtual = (c - 1) * quantile
    prev = np.floor(virtual)
    above = virtual >= c - 1
    last = np.maximum(c - 1, 0)
    pi = np.where(above, last, prev.astype(np.int64))
    ni = np.where(above, last, np.minimum(pi + 1, last))
    prev = np.where(above, -1.0, prev)
    gamma = virtual - prev
    r = np.arange(rows.shape[0])
    a = rows[r, pi]
    b = rows[r, ni]
    with np.errstate(over="ignore", invalid="ignore"):
        diff = b - a
        out = a + diff * gamma
        hi = b - diff * (1 - gamma)
    out = np.where(gamma >= 0.5, hi, out)
    return np.where(c > 0, out, np.nan)


def sorted_rows(values, window: int, rows=None, trailing: bool = True):
    """Selected windows of ``values`` as sorted rows, in chunks.

    Row ``i`` is ``values[max(0, i - window):i]`` when ``trailing`` (the value
    itself excluded), else ``values[max(0, i - window + 1):i + 1]``, padded
    with NaN to ``window`` columns; non-finite values become NaN and sort last.

    Args:
      values: 1-D array.
      window: Window length.
      rows: Row indices (default: every row).
      trailing: Which window (see above).

    Yields:
      ``(start, sorted_block, counts)``: the block holds rows
      ``rows[start:start + len(block)]`` (``counts``: finite values per row).
    """
    x = np.asarray(values, dtype=np.float64)
    if not x.shape[0]:  # nothing to window (e.g. a loss that was never finite)
        return
    clean = np.where(np.isfinite(x), x, np.nan)
    if trailing:
        padded = np.concatenate([np.full(window, np.nan), clean])[:-1]
    else:
        padded = np.concatenate([np.full(window - 1, np.nan), clean])
    views = np.lib.stride_tricks.sliding_window_view(padded, window)
    total = x.shape[0] if rows is None else len(rows)
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // max(1, window))
    for start in range(0, total, step):
        block = views[start:start + step] if rows is None else views[rows[start:start + step]]
        block = np.sort(block, axis=1)
        yield start, block, window - np.count_nonzero(np.isnan(block), axis=1)


def middle(block, counts, window: int) -> np.ndarray:
    """``np.nanmedian`` of each row of a `sorted_rows` block."""
    r = np.arange(block.shape[0])
    return median_of(block[r, (counts - 1) // 2], block[r, counts // 2], counts, window)
