"""The spike rule of `spikes` (its docstring states it): pure numpy, no findings.

Flagging points against a trailing robust window (`flag_spikes`), leaving
earlier spikes out of later windows (`leave_out_spikes`), completing the
spreads of reported points (`fill_spreads`) and grouping flagged points into
episodes (`classify`).
"""

from __future__ import annotations

import numpy as np

from tb_stability.detectors import _robust as R

WINDOW = 128
Z_THRESHOLD = 6.0
REL_JUMP = 0.5
MAX_LEN = 3
TAIL = 3
EARLY_Z_FACTOR = 3.0


def min_history_for(n: int) -> int:
    """Minimum finite predecessors: 20, fewer for short (epoch-level) series."""
    return int(max(5, min(20, n // 5)))


def window_for(n: int) -> int:
    """Trailing window: ``WINDOW`` (128), shorter for short series so that a
    trend (e.g. a fast-falling epoch loss) does not swamp the spread."""
    return int(min(WINDOW, max(20, n // 4)))


def jumped(x, med, rel_jump: float = REL_JUMP):
    """``x - median >= rel_jump * |median|``: the candidates (False where the median is NaN)."""
    with np.errstate(invalid="ignore"):
        return (x - med) >= rel_jump * np.abs(med)


def spiking(x, med, spread, z: float = Z_THRESHOLD, rel_jump: float = REL_JUMP):
    """``(flag, score)``: the rule of the module docstring, for arrays or single values.

    The flag is False where the score is not finite (no history).
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        score = (x - med) / spread
        return (score > z) & jumped(x, med, rel_jump) & np.isfinite(score), score


def flag_spikes(values, window: int | None = None, z: float = Z_THRESHOLD,
                rel_jump: float = REL_JUMP, min_history: int | None = None,
                all_spreads: bool = True):
    """Flags spike points of a series.

    Args:
      values: Loss values in step order (non-finite values are skipped).
      window: Trailing window of finite values (default `window_for`).
      z: Robust z-score threshold.
      rel_jump: Minimum jump relative to ``|median|``.
      min_history: Minimum finite predecessors (default `min_history_for`).
      all_spreads: When False, spreads (and scores) are computed only at the
        candidates ``x - median >= rel_jump * |median|`` and are NaN elsewhere;
        the flags are the same (a non-candidate is never flagged), at a
        fraction of the cost. Use `fill_spreads` for other points.

    Returns:
      ``(flags, medians, spreads, scores)`` over the *finite* subsequence, plus
      ``index``: positions of the finite values in ``values``.
    """
    x = np.asarray(values, dtype=np.float64)
    index = np.flatnonzero(np.isfinite(x))
    f = x[index]
    if min_history is None:
        min_history = min_history_for(f.size)
    if window is None:
        window = window_for(f.size)
    if all_spreads:
        med, spread = R.trailing_stats(f, window, min_history)
    else:
        med, spread = R.trailing_stats(f, window, min_history, where=np.zeros(f.size, bool))
        rows = np.flatnonzero(jumped(f, med, rel_jump))
        spread[rows] = R.trailing_spread(f, window, med, rows)
    flags, score = spiking(f, med, spread, z, rel_jump)
    return flags, med, spread, score, index


def _early_outliers(f, med, window, z, rel_jump, min_history, max_len) -> np.ndarray:
    """Points too early to score (no trailing history) that spike against the points after them.

    They are not reported (the rule needs history before a point), only left
    out of later windows: a bad batch in the first steps of an epoch that
    recurs would otherwise hide every repetition. The points after one may
    hold that repetition, so the test uses their MAD alone (no tail term) and
    a threshold ``EARLY_Z_FACTOR`` (3) times higher.
    """
    out = np.zeros(f.size, dtype=bool)
    for i in np.flatnonzero(np.isnan(med)):
        ahead = f[i + 1:i + 1 + window]
        ahead = ahead[np.isfinite(ahead)]
        if ahead.size < min_history:
            continue
        m = R.median(ahead)
        sp = max(R.MAD_TO_STD * R.mad(ahead), 1e-3 * abs(m), 1e-12)
        out[i] = bool(spiking(f[i], m, sp, EARLY_Z_FACTOR * z, rel_jump)[0])
    for a, b in R.true_runs(out):
        if b - a + 1 > max_len:
            out[a:b + 1] = False
    return out


def leave_out_spikes(values, flags, med, spread, score, window: int | None = None,
                     z: float = Z_THRESHOLD, rel_jump: float = REL_JUMP,
                     min_history: int | None = None, max_len: int = MAX_LEN) -> None:
    """Re-scores (in place) the points whose windows hold an earlier spike, without it.

    The tail-aware spread widens a window that holds an earlier spike (its
    99th percentile is that spike when the window is short), so a spike that
    recurs, e.g. one bad batch every epoch, would hide its repetitions and the
    final step after them. As OLMo leaves skipped steps out of its window, the
    candidates (``x - median >= rel_jump * |median|``) are taken in order, and
    a run of at most ``max_len`` flagged points that came back to range (or
    one too early to score that spikes against the points after it,
    `_early_outliers`) is left out of the windows of every later candidate: their median, spread, score
    and flag are recomputed from the rest. A longer run (a level shift) stays
    in, so the window still follows the curve.

    Args:
      values: The finite series; ``flags``, ``med``, ``spread``, ``score`` from
        ``flag_spikes(values, all_spreads=False)`` (updated in place).
    """
    f = np.asarray(values, dtype=np.float64)
    if min_history is None:
        min_history = min_history_for(f.size)
    if window is None:
        window = window_for(f.size)
    candidates = np.flatnonzero(jumped(f, med, rel_jump))
    left_out = _early_outliers(f, med, window, z, rel_jump, min_history, max_len)
    run_start = run_end = None  # the last run of flagged points
    for i in candidates:
        if run_end is not None and run_end < i - 1:  # that run came back to range
            if run_end - run_start + 1 <= max_len:
                left_out[run_start:run_end + 1] = True
            run_start = run_end = None
        lo = max(0, i - window)
        if left_out[lo:i].any():
            rest = f[lo:i][~left_out[lo:i]]
            if rest.size >= min_history:
                med[i] = R.median(rest)
                spread[i] = R.robust_std(rest)
                flags[i], score[i] = spiking(f[i], med[i], spread[i], z, rel_jump)
        if flags[i]:
            if run_end == i - 1:
                run_end = i
            else:  # the run before was closed above
                run_start = run_end = i


def fill_spreads(values, med, spread, score, points, window: int | None = None) -> None:
    """Completes (in place) the spreads and scores of ``points`` left NaN by
    ``flag_spikes(..., all_spreads=False)``; ``values`` is the finite series."""
    f = np.asarray(values, dtype=np.float64)
    if window is None:
        window = window_for(f.size)
    pts = np.asarray(sorted(set(int(i) for i in points)), dtype=np.int64)
    pts = pts[np.isnan(spread[pts]) & np.isfinite(med[pts])] if pts.size else pts
    if not pts.size:
        return
    spread[pts] = R.trailing_spread(f, window, med, pts)
    with np.errstate(invalid="ignore", divide="ignore"):
        score[pts] = (f[pts] - med[pts]) / spread[pts]


def classify(values, flags, med, spread, z: float = Z_THRESHOLD, rel_jump: float = REL_JUMP,
             tail: int = TAIL, max_len: int | None = MAX_LEN) -> tuple[list, tuple | None]:
    """Groups flagged points into episodes and splits them into kinds.

    An episode starts at a flagged point and extends while the following
    points still exceed the threshold against the statistics frozen at its
    start (as OLMo excludes skipped steps from its window), so a sustained
    blow-up stays one long episode.

    Args:
      values: Finite loss values; ``flags``, ``med``, ``spread`` from
        `flag_spikes` (same length).

    Returns:
      ``(spikes, final)``: spikes is a list of inclusive ``(start, end)``
      mid-run episodes that came back to range, of at most ``max_len`` points
      (None: of any length); final is the episode starting within the last
      ``tail`` points and reaching the end, or None.
    """
    f = np.asarray(values, dtype=np.float64)
    n = f.size
    spikes, final = [], None
    i = 0
    while i < n:
        if not flags[i]:
            i += 1
            continue
        m, sp = med[i], spread[i]
        j = i + 1
        while j < n and spiking(f[j], m, sp, z, rel_jump)[0]:
            j += 1
        s, e = i, j - 1
        if e == n - 1:
            if s >= n - tail:
                final = (s, e)
        elif max_len is None or e - s + 1 <= max_len:
            spikes.append((s, e))
        i = j
    return spikes, final
