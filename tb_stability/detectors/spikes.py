"""loss_spike and final_step_spike.

Signal: the training loss (`_common.loss_series`: the instrumentation's raw
per-step loss, else an ordinary scalar such as ``loss`` or ``epoch_loss``).
Non-finite values are skipped (they are nan_inf).

Rule (OLMo-style, robust): for each point with at least ``min_history``
finite predecessors, take the previous ``WINDOW`` (128) finite values; a point
is *flagged* when

* ``(x - median) / spread > Z_THRESHOLD`` (6) (window ``min(128, max(20, n // 4))``
  so that short epoch-level series are not swamped by their trend), with the tail-aware robust
  spread of `_robust.robust_std` (1.4826 MAD, widened by the window's 99th
  percentile so that routine batch noise, e.g. a smaller last batch, does not
  count), and
* ``x - median >= REL_JUMP * |median|`` (0.5, i.e. at least 1.5x the median;
  llm-foundry uses 2x the window mean).

An episode starts at a flagged point and extends while the following points
exceed the threshold against the statistics frozen at its start. A spike (at
most ``MAX_LEN`` flagged points, then back in range) is left out of the
windows of the points after it (`leave_out_spikes`), so that a spike that
recurs does not hide its repetitions. An episode that starts within the
last ``TAIL`` (3) logged points and runs to the end is a ``final_step_spike``;
an episode followed by a return to range is a ``loss_spike``, whatever its
length: one bad batch, or an excursion of many points (a stretch of bad data,
an optimizer that lost its footing and found it again; a 1.9e7x excursion of
seven points in a run of 512 was reported by nothing before). One that never
comes back is left to divergence, and so is an excursion inside a blow-up of
the first steps (`blowup`). A step is never reported as both kinds.

Severity: ``loss_spike`` is a ``warning``; ``final_step_spike`` is a
``warning``, ``critical`` when the final loss is >= ``HUGE_FACTOR`` (10x) the
window median, because then the weights saved at the end are damaged. Both
are ``info`` when every spike is an epoch's last batch (`recurring_phase`) or
a batch less than half the usual size, the noise of a smaller batch, unless
one reaches ``HUGE_FACTOR`` times its median: that is what the samples hold.
"""

from __future__ import annotations

import numpy as np

from tb_stability import running_mean as RM
from tb_stability.detectors import _common as C
from tb_stability.detectors import _robust as R
from tb_stability.detectors import gradients
from tb_stability.findings import Finding
from tb_stability.rundata import RunData

WINDOW = 128
Z_THRESHOLD = 6.0
REL_JUMP = 0.5
MAX_LEN = 3
TAIL = 3
HUGE_FACTOR = 10.0
MAX_LISTED = 10
EARLY_Z_FACTOR = 3.0
PHASE_MAX_PERIOD = 1000
PHASE_MIN_POINTS = 8
PHASE_RATIO = 3.0
PHASE_MIN_MULTIPLE_POINTS = 3
PHASE_SHARE_GAIN = 0.25


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


def recurring_phase(values, spike_idx, steps, max_period: int = PHASE_MAX_PERIOD,
                    min_points: int = PHASE_MIN_POINTS, ratio: float = PHASE_RATIO) -> int | None:
    """Smallest period P at whose phase all spikes sit and the loss is far noisier.

    The series is first laid on the grid of its logged ``steps`` (one point
    per ``spacing`` steps; points left out, e.g. `running_mean`'s undetermined
    epoch ends, are gaps), so P counts steps; where the steps lie on no grid,
    P counts points.

    The absolute residual ``|x - rolling_median(x, 25)|`` is computed once; for
    each candidate period P (2..max_period) with every spike index congruent
    modulo P, the median residual at that phase (at least ``min_points``
    points) must be >= ``ratio`` times the median of all residuals. This is
    the signature of a tiny last batch in every epoch, or of one bad batch
    that comes back every epoch because the data is not shuffled.

    A period with fewer points at its phase (a few long epochs) holds when
    every one of them from the first spike on is a spike, at least
    `PHASE_MIN_MULTIPLE_POINTS` of them.

    Large spikes every 2P steps also pass at P (half of that phase's points
    are spikes), so a multiple kP (at least `PHASE_MIN_MULTIPLE_POINTS` points)
    replaces P when a larger share of its phase is that noisy
    (`PHASE_SHARE_GAIN` more).

    Returns:
      The period, or None.
    """
    x, spike_idx, unit = _on_step_grid(steps, np.asarray(values, dtype=np.float64),
                                       [int(i) for i in spike_idx])
    if not spike_idx or np.count_nonzero(np.isfinite(x)) < 2 * min_points:
        return None
    resid = np.abs(x - R.rolling_median(x, 25))
    overall = R.median(resid)
    if not overall > 0:
        return None
    phase0 = spike_idx[0]

    def congruent(p):
        return not any((i - phase0) % p for i in spike_idx)

    def phase(p):
        pts = resid[phase0 % p::p]
        return pts[np.isfinite(pts)]

    def share(p):
        return float(np.mean(phase(p) >= ratio * overall))

    flagged = set(spike_idx)

    def every_repetition(p):
        slots = [i for i in range(phase0, x.size, p) if np.isfinite(x[i])]
        return len(slots) >= PHASE_MIN_MULTIPLE_POINTS and flagged.issuperset(slots)

    for p in range(2, min(max_period, x.size // PHASE_MIN_MULTIPLE_POINTS) + 1):
        if not congruent(p):
            continue
        pts = phase(p)
        if (pts.size >= min_points and R.median(pts) >= ratio * overall) or (
                pts.size < min_points and every_repetition(p)):
            best = p
            for q in range(2 * p, min(max_period, x.size // PHASE_MIN_MULTIPLE_POINTS) + 1, p):
                if congruent(q) and share(q) >= share(best) + PHASE_SHARE_GAIN:
                    best = q
            return best * unit
    return None


MAX_GRID_GROWTH = 2  # a grid more than this many times the points is not a grid


def _on_step_grid(steps, values, spike_idx) -> tuple[np.ndarray, list[int], int]:
    """``values`` at their places on the grid of ``steps`` (NaN in the gaps), the
    spikes' grid indices and the grid's spacing; unchanged (spacing 1) when the
    steps lie on no grid."""
    steps = np.asarray(steps, dtype=np.int64)
    unit = RM.spacing(steps)
    offsets = steps - steps[0] if steps.size else steps
    if not steps.size or np.any(offsets % unit):
        return values, spike_idx, 1
    slots = offsets // unit
    if slots[-1] + 1 > MAX_GRID_GROWTH * steps.size:
        return values, spike_idx, 1
    grid = np.full(int(slots[-1]) + 1, np.nan)
    grid[slots] = values
    return grid, [int(slots[i]) for i in spike_idx], unit


def _small_batch_steps(run: RunData, steps) -> list[int]:
    """Steps among ``steps`` whose logged batch size is < half the median."""
    bs = run.steps.get("batch_size")
    if bs is None or not len(bs):
        return []
    med = R.median(bs.values)
    out = []
    for st in steps:
        v = C.value_at(bs, int(st))
        if v is not None and med > 0 and v < 0.5 * med:
            out.append(int(st))
    return out


def _same_batch_every_epoch(period, where) -> tuple[int, int] | None:
    """``(position, epoch_length)`` when the recurring spikes are one mid-epoch batch.

    None when there is no period, the epochs are unknown (``where`` None), or
    every spike is an epoch's last batch (the tiny-last-batch signature).
    """
    if period is None or where is None:
        return None
    position, length = where
    if not length.size or np.any(length <= 0):
        return None
    if np.all(position == length - 1):
        return None
    return int(position[0]), int(length[0])


def _same_batch_remedy(same_batch, keras_log: bool = False) -> str:
    """The first remedy lines for one bad batch that recurs every epoch ("" otherwise).

    ``keras_log``: the positions count the points Keras' TensorBoard callback
    logged, one per call of its batch hook, which holds N batches under
    ``compile(steps_per_execution=N)``; a log cannot tell N.
    """
    if same_batch is None:
        return ""
    k = same_batch[0]
    return (
        f"Look at batch {k + 1} of the epoch (in unshuffled order, samples "
        f"{k} * batch_size to {k + 1} * batch_size - 1), fix or drop the bad samples, and "
        "shuffle every epoch so that no batch is always the same:\n"
        f"    bad = slice({k} * batch_size, {k + 1} * batch_size)\n"
        "    print(x[bad], y[bad])\n"
        "    model.fit(x, y, batch_size=batch_size, shuffle=True)  # tf.data: ds.shuffle(n).batch(b)\n"
        + (f"(Positions count the batches Keras' TensorBoard callback logged: under "
           f"compile(steps_per_execution=N) it logs once per N batches, so look at samples "
           f"{k} * N * batch_size to {k + 1} * N * batch_size - 1.)\n" if keras_log else "")
    )


def _outside_early_blowup(values, episodes: list) -> list:
    """``episodes`` without the excursions (longer than ``MAX_LEN``) inside an early blow-up.

    A loss that blows up in its first steps and comes back is `blowup`'s
    ``divergence`` (with a warm-up remedy); the same points are not a spike too.
    """
    from tb_stability.detectors import blowup  # blowup reads MAX_LEN from here

    b = blowup.early_blowup(values)
    if b is None:
        return episodes
    end = b["back_index"] if b["back_index"] is not None else len(values)
    return [(s, e) for s, e in episodes if e - s + 1 <= MAX_LEN or e < b["onset"] or s > end]


def detect(run: RunData) -> list[Finding]:
    """loss_spike / final_step_spike adapter (see module docstring)."""
    loss, source = C.loss_series(run)
    if loss is None:
        return []
    flags, med, spread, score, index = flag_spikes(loss.values, all_spreads=False)
    steps = loss.steps[index]
    values = loss.values[index]
    leave_out_spikes(values, flags, med, spread, score)
    if not flags.any():
        return []
    spikes, final = classify(values, flags, med, spread, max_len=None)
    spikes = _outside_early_blowup(values, spikes)
    fill_spreads(values, med, spread, score,
                 [i for a, b in spikes + ([final] if final else []) for i in range(a, b + 1)])
    if final is not None and index[final[1]] != len(loss) - 1:
        final = None  # the loss went non-finite afterwards: that is nan_inf
    if not spikes and final is None:
        return []
    flagged = [i for a, b in spikes + ([final] if final else []) for i in range(a, b + 1)]
    period = recurring_phase(values, flagged, steps)
    small = _small_batch_steps(run, steps[flagged])
    where = C.epoch_positions(run, source, steps[flagged])
    same_batch = _same_batch_every_epoch(period, where)
    benign = (small and len(small) == len(flagged)) or (period is not None and same_batch is None)
    # A smaller batch's noise lifts its loss a few times (2-5x on a 1-sample last
    # batch of a real MLP); HUGE_FACTOR times is what its samples hold, not noise.
    with np.errstate(divide="ignore", invalid="ignore"):
        largest = float(np.nanmax(values[flagged] / np.abs(med[flagged])))
    outliers = benign and largest >= HUGE_FACTOR
    benign = benign and not outliers
    if outliers:
        at = (f"recur every {period} steps at the last batch of each epoch" if period
              else "are all on a batch less than half the usual size")
        benign_note = (
            f" The spikes {at}, {C.fmt(largest)}x the median: far more than a smaller batch's "
            "noise, so those samples (the last of the data, when it is not shuffled) hold "
            "outliers or wrong labels."
        )
    elif benign and period:
        at = (" at the last batch of each epoch" if where is not None
              else " at the same position")
        benign_note = f" The spikes recur every {period} steps{at}, the signature of a tiny last batch."
    elif benign:
        benign_note = " Every spike is on a batch less than half the usual size."
    elif same_batch is not None:
        benign_note = (
            f" The spikes recur every {period} steps, at batch {same_batch[0] + 1} of "
            f"{same_batch[1]} in each epoch: the same samples every epoch (the data is not "
            "shuffled), and they hold outliers or wrong labels."
        )
    else:
        benign_note = ""
    grad = C.global_grad_norm(run)
    grad_med = R.median(grad.values) if grad is not None and len(grad) else None
    run_clipnorm = gradients.remedy_settings(run).clipnorm
    out = []

    def point(i):
        g = C.value_at(grad, int(steps[i]))
        return {
            "step": int(steps[i]),
            "loss": float(values[i]),
            "window_median": float(med[i]),
            "robust_spread": float(spread[i]),
            "z": float(score[i]),
            "ratio_to_median": float(values[i] / med[i]) if med[i] else None,
            "grad_norm": C.num(g),
        }

    threshold = (f"(loss - median)/robust_spread > {Z_THRESHOLD:g} over the previous "
                 f"{window_for(values.size)} values and loss >= {1 + REL_JUMP:g}x median")
    if spikes:
        pts = [point(i) for s, e in spikes for i in range(s, e + 1)]
        worst = max(pts, key=lambda p: p["z"])
        longest = max(e - s + 1 for s, e in spikes)
        at_worst = next((s, e) for s, e in spikes if steps[s] <= worst["step"] <= steps[e])
        stayed = (f" after {at_worst[1] - at_worst[0] + 1} points above its range (steps "
                  f"{int(steps[at_worst[0]])}-{int(steps[at_worst[1]])}; "
                  if at_worst[1] - at_worst[0] + 1 > MAX_LEN else " (")
        grad_spike = (
            grad_med is not None and worst["grad_norm"] is not None
            and np.isfinite(worst["grad_norm"]) and worst["grad_norm"] >= 5 * grad_med
        )
        if grad_med:
            clip = run_clipnorm or C.round_sig(2 * grad_med)
            clip_line = (
                f"The gradient norm also jumped ({C.fmt(worst['grad_norm'])} vs median "
                f"{C.fmt(grad_med)}); clip it at ~2x the median:\n"
                if grad_spike else
                f"Clip gradients at ~2x the median norm ({C.fmt(grad_med)}):\n"
            ) + f"    optimizer = {C.optimizer_call(run, f'learning_rate=..., clipnorm={clip:g}')}\n"
        else:
            clip_line = ("Clip gradients (set clipnorm to ~2x the typical gradient norm):\n"
                         f"    optimizer = {C.optimizer_call(run, 'learning_rate=..., clipnorm=1.0')}\n")
        out.append(Finding(
            kind="loss_spike",
            severity="info" if benign else "warning",
            run=run.name,
            first_step=int(steps[spikes[0][0]]),
            last_step=int(steps[spikes[-1][1]]),
            evidence={
                "source": source,
                "count": len(spikes),
                "spikes": pts[:MAX_LISTED],
                "worst_step": worst["step"],
                "longest_points": longest,
                "threshold": threshold,
                "median_grad_norm": C.num(grad_med),
                "recurring_period": period,
                "batch_in_epoch": None if same_batch is None else same_batch[0] + 1,
                "batches_per_epoch": None if same_batch is None else same_batch[1],
            },
            explanation=(
                f"The loss jumped to {C.fmt(worst['loss'])} at step {worst['step']}, "
                f"{C.fmt(worst['ratio_to_median'])}x its recent median ({C.fmt(worst['window_median'])}), "
                f"and came back{stayed}{len(spikes)} spike(s) in total)." + benign_note
            ),
            remedy=(
                _same_batch_remedy(same_batch, keras_log=source == C.PER_BATCH_SOURCE)
                + clip_line
                + "If the spikes recur at the same batches, inspect those samples for outliers "
                "or bad labels; warm up or lower the learning rate:\n"
                "    lr = keras.optimizers.schedules.CosineDecay(0.0, decay_steps=10_000, "
                "warmup_target=1e-3, warmup_steps=500)"
            ),
        ))
    if final is not None:
        i = final[1]
        p = point(i)
        ratio = p["ratio_to_median"] or 0.0
        severity = "critical" if ratio >= HUGE_FACTOR else "warning"
        if benign:
            severity = "info"
        lr = C.lr_at(run, p["step"])
        clip = run_clipnorm or (C.round_sig(2 * grad_med) if grad_med else 1.0)
        out.append(Finding(
            kind="final_step_spike",
            severity=severity,
            run=run.name,
            first_step=int(steps[final[0]]),
            last_step=int(steps[i]),
            evidence={
                "source": source,
                "last_points": [point(j) for j in range(final[0], i + 1)],
                "threshold": threshold + f"; critical when >= {HUGE_FACTOR:g}x median",
                "learning_rate": C.num(lr),
                "median_grad_norm": C.num(grad_med),
                "recurring_period": period,
            },
            explanation=(
                f"The last logged loss ({C.fmt(p['loss'])} at step {p['step']}) is "
                f"{C.fmt(ratio)}x the median of the preceding steps ({C.fmt(p['window_median'])}). "
                "The final update came from an outlier batch (often a smaller last batch) or a "
                "learning rate still too high at the end, and the saved weights reflect it." + benign_note
                + (" (This loss is recovered from Keras' running mean: if that last batch was "
                   "smaller than the others, its own loss was higher still.)"
                   if source == C.PER_BATCH_SOURCE else "")
            ),
            remedy=(
                "Check the size of the last batch and drop the remainder; decay the learning "
                "rate to the end; keep the best weights rather than the last:\n"
                "    ds = ds.batch(32, drop_remainder=True)\n"
                "    lr = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=total_steps)\n"
                f"    optimizer = {C.optimizer_call(run, f'learning_rate=lr, clipnorm={clip:g}')}\n"
                "    keras.callbacks.ModelCheckpoint('best.keras', monitor='loss', save_best_only=True)"
            ),
        ))
    return out
