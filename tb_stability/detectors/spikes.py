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
exceed the threshold against the statistics frozen at its start. An episode that starts within the
last ``TAIL`` (3) logged points and runs to the end is a ``final_step_spike``;
an episode of at most ``MAX_LEN`` (3) points followed by a return to range is a
``loss_spike``. Longer excursions are left to divergence. A step is never
reported as both kinds.

Severity: ``loss_spike`` is a ``warning``; ``final_step_spike`` is a
``warning``, ``critical`` when the final loss is >= ``HUGE_FACTOR`` (10x) the
window median, because then the weights saved at the end are damaged.
"""

from __future__ import annotations

import numpy as np

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
PHASE_MAX_PERIOD = 1000
PHASE_MIN_POINTS = 8
PHASE_RATIO = 3.0


def min_history_for(n: int) -> int:
    """Minimum finite predecessors: 20, fewer for short (epoch-level) series."""
    return int(max(5, min(20, n // 5)))


def window_for(n: int) -> int:
    """Trailing window: ``WINDOW`` (128), shorter for short series so that a
    trend (e.g. a fast-falling epoch loss) does not swamp the spread."""
    return int(min(WINDOW, max(20, n // 4)))


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
        with np.errstate(invalid="ignore"):
            rows = np.flatnonzero((f - med) >= rel_jump * np.abs(med))
        spread[rows] = R.trailing_spread(f, window, med, rows)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = (f - med) / spread
        flags = (score > z) & ((f - med) >= rel_jump * np.abs(med))
    flags &= np.isfinite(score)
    return flags, med, spread, score, index


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
             tail: int = TAIL, max_len: int = MAX_LEN) -> tuple[list, tuple | None]:
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
      mid-run episodes of at most ``max_len`` points; final is the episode
      starting within the last ``tail`` points and reaching the end, or None.
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
        while j < n and (f[j] - m) / sp > z and (f[j] - m) >= rel_jump * abs(m):
            j += 1
        s, e = i, j - 1
        if e == n - 1:
            if s >= n - tail:
                final = (s, e)
        elif e - s + 1 <= max_len:
            spikes.append((s, e))
        i = j
    return spikes, final


def recurring_phase(values, spike_idx, max_period: int = PHASE_MAX_PERIOD,
                    min_points: int = PHASE_MIN_POINTS, ratio: float = PHASE_RATIO) -> int | None:
    """Smallest period P at whose phase all spikes sit and the loss is far noisier.

    The absolute residual ``|x - rolling_median(x, 25)|`` is computed once; for
    each candidate period P (2..max_period) with every spike index congruent
    modulo P, the median residual at that phase (at least ``min_points``
    points) must be >= ``ratio`` times the median of all residuals. This is
    the signature of a tiny last batch in every epoch.

    Returns:
      The period, or None.
    """
    x = np.asarray(values, dtype=np.float64)
    spike_idx = [int(i) for i in spike_idx]
    if not spike_idx or x.size < 2 * min_points:
        return None
    resid = np.abs(x - R.rolling_median(x, 25))
    overall = R.median(resid)
    if not overall > 0:
        return None
    phase0 = spike_idx[0]
    for p in range(2, min(max_period, x.size // min_points) + 1):
        if any((i - phase0) % p for i in spike_idx):
            continue
        pts = resid[phase0 % p::p]
        if pts.size >= min_points and R.median(pts) >= ratio * overall:
            return p
    return None


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


def detect(run: RunData) -> list[Finding]:
    """loss_spike / final_step_spike adapter (see module docstring)."""
    loss, source = C.loss_series(run)
    if loss is None:
        return []
    flags, med, spread, score, index = flag_spikes(loss.values, all_spreads=False)
    if not flags.any():
        return []
    steps = loss.steps[index]
    values = loss.values[index]
    spikes, final = classify(values, flags, med, spread)
    fill_spreads(values, med, spread, score,
                 [i for a, b in spikes + ([final] if final else []) for i in range(a, b + 1)])
    if final is not None and index[final[1]] != len(loss) - 1:
        final = None  # the loss went non-finite afterwards: that is nan_inf
    if not spikes and final is None:
        return []
    flagged = [i for a, b in spikes + ([final] if final else []) for i in range(a, b + 1)]
    period = recurring_phase(values, flagged)
    small = _small_batch_steps(run, steps[flagged])
    benign = period is not None or (small and len(small) == len(flagged))
    benign_note = (
        f" The spikes recur every {period} steps at the same position, the signature of a "
        "tiny last batch each epoch." if period else
        " Every spike is on a batch less than half the usual size." if benign else ""
    )
    grad = run.steps.get("grad_norm")
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
                "threshold": threshold,
                "median_grad_norm": C.num(grad_med),
                "recurring_period": period,
            },
            explanation=(
                f"The loss jumped to {C.fmt(worst['loss'])} at step {worst['step']}, "
                f"{C.fmt(worst['ratio_to_median'])}x its recent median ({C.fmt(worst['window_median'])}), "
                f"and came back ({len(spikes)} spike(s) in total)." + benign_note
            ),
            remedy=(
                clip_line
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
