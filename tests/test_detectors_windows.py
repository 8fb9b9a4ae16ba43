"""Fast window statistics (`_windows`, `_robust`) against slow, obvious references.

The references are the original implementations: numpy's ``nanmedian`` /
``nanpercentile`` on every NaN-padded sliding window. The fast versions must
give *identical* numbers (bit for bit), including NaN/inf gaps, short series,
windows longer than the series, windows shorter than the warm-up and windows
of 600+ values (where numpy switches its median code path).
"""

from __future__ import annotations

import math
import statistics
import warnings

import numpy as np
import pytest

from tb_stability.detectors import _robust, _windows, spikes


def ref_rolling_median(values, k):
    x = np.asarray(values, dtype=np.float64)
    k = max(1, int(k))
    clean = np.where(np.isfinite(x), x, np.nan)
    padded = np.concatenate([np.full(k - 1, np.nan), clean])
    views = np.lib.stride_tricks.sliding_window_view(padded, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(views, axis=1)


def ref_trailing_stats(values, window, min_history, rel_floor=1e-3, abs_floor=1e-12):
    m, s, counts = ref_trailing_unmasked(values, window, rel_floor, abs_floor)
    ok = counts >= min_history
    return np.where(ok, m, np.nan), np.where(ok, s, np.nan)


def ref_trailing_unmasked(values, window, rel_floor=1e-3, abs_floor=1e-12):
    x = np.asarray(values, dtype=np.float64)
    n = x.shape[0]
    clean = np.where(np.isfinite(x), x, np.nan)
    padded = np.concatenate([np.full(window, np.nan), clean])
    views = np.lib.stride_tricks.sliding_window_view(padded[:-1], window)
    counts = np.isfinite(views).sum(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m = np.nanmedian(views, axis=1)
        d = np.nanmedian(np.abs(views - m[:, None]), axis=1)
        q = np.nanpercentile(views, 99, axis=1)
    s = np.maximum.reduce([1.4826 * d, (q - m) / 2.326, rel_floor * np.abs(m),
                           np.full(n, abs_floor)])
    return m, s, counts


def series(rng, n, kind):
    if kind == "ties":
        x = rng.integers(0, 4, n).astype(np.float64)
    elif kind == "negative":
        x = -rng.lognormal(0, 2, n) * 1e3
    else:
        x = rng.lognormal(0, 0.7, n)
        x[rng.random(n) < 0.02] *= 30
    x[rng.random(n) < rng.uniform(0, 0.4)] = np.nan
    x[rng.random(n) < 0.03] = np.inf
    x[rng.random(n) < 0.02] = -np.inf
    if n > 10 and rng.random() < 0.3:
        a = int(rng.integers(0, n - 5))
        x[a:a + int(rng.integers(1, n - a))] = np.nan  # a long gap
    return x


def assert_identical(got, ref):
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape
    assert np.array_equal(got, ref, equal_nan=True), np.flatnonzero(
        ~((got == ref) | (np.isnan(got) & np.isnan(ref))))[:10]


@pytest.mark.parametrize("seed", range(12))
def test_rolling_median_identical_to_nanmedian(seed):
    rng = np.random.default_rng(seed)
    kind = ("plain", "ties", "negative")[seed % 3]
    n = int(rng.integers(0, 300))
    x = series(rng, n, kind)
    for k in (1, 2, 3, int(rng.integers(4, 48)), 48, 49, int(rng.integers(50, 400)), n + 5):
        assert_identical(_robust.rolling_median(x, k), ref_rolling_median(x, k))


@pytest.mark.parametrize("k", [599, 600, 601, 1000])
def test_rolling_median_long_windows_identical(k):
    rng = np.random.default_rng(k)
    x = series(rng, 1500, "plain")
    assert_identical(_robust.rolling_median(x, k), ref_rolling_median(x, k))


def test_rolling_median_matches_statistics_median():
    rng = np.random.default_rng(7)
    x = series(rng, 200, "plain")
    for k in (5, 60):
        ref = []
        for i in range(len(x)):
            w = [v for v in x[max(0, i - k + 1):i + 1] if math.isfinite(v)]
            ref.append(statistics.median(w) if w else math.nan)
        np.testing.assert_allclose(_robust.rolling_median(x, k), ref, rtol=1e-15, equal_nan=True)


@pytest.mark.parametrize("seed", range(12))
def test_trailing_stats_identical_to_nanmedian_nanpercentile(seed):
    rng = np.random.default_rng(100 + seed)
    kind = ("plain", "ties", "negative")[seed % 3]
    n = int(rng.integers(0, 400))
    x = series(rng, n, kind)
    for window in (1, 2, int(rng.integers(3, 48)), 128, n + 3):
        m, s, counts = ref_trailing_unmasked(x, window)
        for min_history in (0, 1, int(rng.integers(2, 30)), window + 1):
            med, spread = _robust.trailing_stats(x, window, min_history)
            ok = counts >= min_history
            assert_identical(med, np.where(ok, m, np.nan))
            assert_identical(spread, np.where(ok, s, np.nan))


@pytest.mark.parametrize("window", [600, 700])
def test_trailing_stats_long_windows_identical(window):
    rng = np.random.default_rng(window)
    x = series(rng, 1200, "plain")
    med, spread = _robust.trailing_stats(x, window, 20)
    rmed, rspread = ref_trailing_stats(x, window, 20)
    assert_identical(med, rmed)
    assert_identical(spread, rspread)


def test_trailing_stats_where_only_limits_the_spread():
    rng = np.random.default_rng(3)
    x = series(rng, 500, "plain")
    where = rng.random(500) < 0.3
    med, spread = _robust.trailing_stats(x, 40, 10, where=where)
    rmed, rspread = ref_trailing_stats(x, 40, 10)
    assert_identical(med, rmed)
    assert_identical(spread[where], rspread[where])
    assert np.isnan(spread[~where]).all()
    rows = np.flatnonzero(np.isfinite(rmed))[::7]
    assert_identical(_robust.trailing_spread(x, 40, rmed, rows), rspread[rows])


def test_range_order_kth_matches_sorting():
    rng = np.random.default_rng(11)
    x = series(rng, 333, "ties")
    order = _windows.RangeOrder(x)
    lo = rng.integers(0, 333, 500)
    hi = np.minimum(333, lo + rng.integers(0, 80, 500))
    count = order.count(lo, hi)
    keep = count > 0
    lo, hi, count = lo[keep], hi[keep], count[keep]
    k = (rng.random(lo.size) * count).astype(int)
    got = order.kth(lo, hi, k)
    for a, b, kk, g in zip(lo, hi, k, got):
        w = np.sort(x[a:b][np.isfinite(x[a:b])])
        assert g == w[kk]


def test_percentile_of_identical_to_nanpercentile():
    rng = np.random.default_rng(5)
    rows = rng.normal(size=(300, 37))
    rows[rng.random(rows.shape) < 0.3] = np.nan
    rows[:5] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for q in (0, 10, 50, 90, 99, 100):
            ref = np.nanpercentile(rows, q, axis=1)
            srt = np.sort(rows, axis=1)
            got = _windows.percentile_of(srt, np.count_nonzero(~np.isnan(srt), axis=1), q)
            assert_identical(got, ref)


@pytest.mark.parametrize("seed", range(8))
def test_flag_spikes_candidates_only_gives_the_same_flags(seed):
    rng = np.random.default_rng(200 + seed)
    n = int(rng.integers(20, 3000))
    x = 2.0 * np.exp(-np.arange(n) / n) * rng.lognormal(0, rng.uniform(0.01, 0.6), n)
    x[rng.choice(n, 1 + n // 100, replace=False)] *= rng.uniform(1.2, 30)
    x[rng.random(n) < 0.05] = np.nan
    full = spikes.flag_spikes(x)
    fast = spikes.flag_spikes(x, all_spreads=False)
    assert_identical(fast[0], full[0])  # flags
    assert_identical(fast[1], full[1])  # medians
    assert_identical(fast[4], full[4])  # index
    cand = np.isfinite(fast[2])
    assert fast[0][~cand].sum() == 0
    assert_identical(fast[2][cand], full[2][cand])
    assert_identical(fast[3][cand], full[3][cand])
    f = x[np.isfinite(x)]
    med, spread, score = fast[1], fast[2].copy(), fast[3].copy()
    pts = rng.choice(f.size, min(f.size, 40), replace=False)
    spikes.fill_spreads(f, med, spread, score, pts)
    assert_identical(spread[pts], full[2][pts])
    assert_identical(score[pts], full[3][pts])


def test_big_series_is_fast_and_exact_on_a_sample():
    import time

    rng = np.random.default_rng(0)
    n = 100_000
    x = 2.3 * np.exp(-np.arange(n) / 30_000) + rng.normal(0, 0.02, n)
    x[rng.random(n) < 0.01] = np.nan
    start = time.perf_counter()
    sm = _robust.rolling_median(x, n // 20)
    med, _ = _robust.trailing_stats(x, 128, 20, where=np.zeros(n, bool))
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0  # the sliding nanmedian took ~10 s here
    rows = rng.choice(n, 50, replace=False)
    for i in rows:
        w = x[max(0, i - n // 20 + 1):i + 1]
        assert sm[i] == np.median(w[np.isfinite(w)])
        w = x[max(0, i - 128):i]
        w = w[np.isfinite(w)]
        assert (med[i] == (np.sort(w)[(w.size - 1) // 2] + np.sort(w)[w.size // 2]) / 2
                if w.size >= 20 else np.isnan(med[i]))
