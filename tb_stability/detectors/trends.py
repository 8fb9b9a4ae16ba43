"""divergence, stalled and oscillation: the shape of the loss curve.

All three read the training loss chosen by `_common.loss_series` (raw
per-step loss, else ``loss``/``train_loss``/``epoch_loss``/``batch_loss``),
finite values only, and need at least ``MIN_POINTS`` (8) of them.

divergence
  (A loss that blows up in its first steps is `blowup`'s, and a per-epoch loss
  that rises at every one of its last epochs `epoch_curve`'s, reported under
  the same kind where this test does not fire.) Smooth with a trailing median of ``k = max(3, n // 20)`` points. With
  ``best`` the lowest smoothed level, the run diverges when the final smoothed
  level is >= ``RISE`` (2x) ``best`` and the smoothed curve stays above
  ``SUSTAIN`` (1.5x) ``best`` for the last ``max(3, n // 10)`` points (so a
  spike is not a trend), and the rise must exceed ``exp(NOISE_Z * s)`` (5),
  with ``s`` the log-space spread of a median of ``k`` points of this series
  (`_robust.noise_bound`): the lowest of many medians of a very noisy loss
  (tiny batches) is luck, not a level the run left. From ``NOISE_MIN_POINTS``
  (64) points on, ``k`` also grows with that noise, up to a quarter of the
  run, until a median scatters by about ``NOISE_LEVEL`` (0.15) in log units
  (`_robust.median_window`). Onset: first point after the minimum above 1.5x
  best.
  Severity: ``critical`` when the final level is >= ``BLOWUP`` (10x) best or
  the loss ends non-finite, else ``warning``.

stalled
  (a) Whole run: relative improvement ``(start - end) / |start|`` between the
  medians of the first and last 10% (>= 3 points) is below ``STALL_REL`` (1%)
  and, when per-variable update ratios are logged, the median kernel update
  ratio is below ``STALL_UPDATE`` (1e-4). (b) Second half: improvement below
  1% while the median kernel update ratio there is below ``FROZEN`` (1e-5;
  weights frozen, e.g. dead units), or, where no update ratios are logged, the
  per-epoch loss is frozen in place (`epoch_curve.frozen`: within 1e-5 of its
  level over the second half of the epochs), and the loss is not already ~0
  (end level > 1e-3 x start level). A loss that ends more than ``STALL_WORSE`` (1.5x)
  above where it started is not stalled (divergence reads rises), nor is a
  run the divergence rules flag (`divergence`, or a blow-up in the first steps
  that did not recover, `blowup.early_blowup`). Where no update ratios are
  logged and the loss ended more than ``WORSE_REL`` (10%) above its start, or
  its relative spread (1.4826 MAD / median) in the first 10% is ``NOISIER``
  (3) times that of the last 10% (it bounced, then settled), the remedy lowers
  the learning rate instead of raising it: a rate too small gives a slow, quiet
  descent, not a rise. Severity: ``warning``.
  For the per-batch losses recovered from Keras' ``batch_loss``
  (`_common.PER_BATCH_SOURCE`), test (a) compares the first and the last
  ``epoch_loss`` instead when there are at least ``EPOCH_POINTS`` (3) epochs:
  each is the exact mean of an epoch's batches, where a short run's per-batch
  losses are too noisy to resolve 1%.

oscillation
  In the second half of the run: no progress (improvement < ``OSC_PROGRESS``,
  5%), a large swing ``(q90 - q10) / median >= OSC_AMPLITUDE`` (0.5) and a
  see-saw pattern: lag-1 autocorrelation <= ``OSC_LAG1`` (-0.3) or a periodic
  autocorrelation >= ``OSC_PERIODIC`` (0.5) at some lag in 2..n/4 (<= 50).
  Needs 16 points in that half. Severity: ``warning``.
"""

from __future__ import annotations

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.detectors import _remedies as remedies
from tb_stability.detectors import _robust as R
from tb_stability.detectors import blowup, epoch_curve, gradients
from tb_stability.findings import Finding
from tb_stability.rundata import RunData

MIN_POINTS = 8
RISE = 2.0
SUSTAIN = 1.5
BLOWUP = 10.0
NOISE_Z = 5.0
NOISE_MIN_POINTS = 64
NOISE_LEVEL = 0.15
STALL_REL = 0.01
STALL_WORSE = 1.5
WORSE_REL = 0.1
NOISIER = 3.0
STALL_UPDATE = 1e-4
FROZEN = 1e-5
EPOCH_POINTS = 3
OSC_PROGRESS = 0.05
OSC_AMPLITUDE = 0.5
OSC_LAG1 = -0.3
OSC_PERIODIC = 0.5
OSC_MIN_HALF = 16


def divergence(values) -> dict | None:
    """Divergence test on finite loss values (see module docstring).

    Returns:
      None, or a dict with ``best``, ``best_index``, ``final``, ``ratio`` and
      ``onset`` (indices into ``values``).
    """
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n < MIN_POINTS:
        return None
    sigma = R.log_noise(x)
    k = max(3, n // 20)
    if n >= NOISE_MIN_POINTS:  # fewer points: a blow-up would read as noise
        k = max(k, min(n // 4, R.median_window(sigma, NOISE_LEVEL)))
    sm = R.rolling_median(x, k)
    sm[: k - 1] = np.nan
    if np.all(np.isnan(sm)):
        return None
    b = int(np.nanargmin(sm))
    best = float(sm[b])
    final = float(sm[-1])
    if not best > 0 or final < RISE * best:
        return None
    if final < best * R.noise_bound(sigma, NOISE_Z, points=k):
        return None  # the lowest of many noisy medians: not a level the loss left
    tail = max(3, n // 10)
    if not np.all(sm[-tail:] > SUSTAIN * best):
        return None
    onset = b + 1 + int(np.argmax(sm[b + 1:] > SUSTAIN * best))
    onset = max(b, onset - k // 2)
    return {"best": best, "best_index": b, "final": final, "ratio": final / best, "onset": onset}


def improvement(values, fraction: float = 0.1) -> float:
    """Relative improvement between the first and last ``fraction`` (medians)."""
    return relative_improvement(R.level(values, fraction), R.level(values, fraction, at_end=True))


def relative_improvement(start: float, end: float) -> float:
    """``(start - end) / |start|``; NaN where ``start`` is not finite or ~0."""
    if not np.isfinite(start) or abs(start) < 1e-12:
        return float("nan")
    return (start - end) / abs(start)


def _blew_up(run: RunData, values) -> bool:
    """The loss blew up in its first steps and did not recover (`blowup.early_blowup`)."""
    b = blowup.early_blowup(values, C.label_entropy(run))
    return b is not None and b["outcome"] != "recovered"


def _diverges(run: RunData, values) -> bool:
    """Whether ``detect_divergence`` reports the run (by any of its three tests)."""
    return divergence(values) is not None or _blew_up(run, values) or epoch_curve.rises(run)


def _relative_spread(part) -> float:
    """Robust spread over level (1.4826 MAD / |median|); NaN where the median is 0."""
    med = float(np.median(part))
    return R.MAD_TO_STD * R.mad(part) / abs(med) if med else float("nan")


def _noise_drop(values, fraction: float = 0.1) -> tuple[float, float] | None:
    """``(first, last)`` relative spreads of the first and last ``fraction`` when the first is
    ``NOISIER`` (3) times the last: a loss that bounced, then settled (e.g. collapsed to a
    constant prediction). A rate too small keeps one level of batch noise throughout."""
    x = np.asarray(values, dtype=np.float64)
    k = max(MIN_POINTS, int(round(fraction * x.size)))
    if x.size < 2 * k:
        return None
    first, last = _relative_spread(x[:k]), _relative_spread(x[-k:])
    if np.isfinite(first) and last > 0 and first >= NOISIER * last:
        return first, last
    return None


def _held(still: dict) -> str:
    """How closely a frozen per-epoch loss held its level (`epoch_curve.frozen`), in words."""
    if still["relative_range"] == 0:
        return f"exactly at {still['level']:.6g}"
    return f"within {still['relative_range']:.1e} of {still['level']:.6g} (relative)"


def _no_progress(imp: float) -> bool:
    """Improved by less than ``STALL_REL`` and ended at most ``STALL_WORSE`` x its start."""
    return bool(np.isfinite(imp) and 1 - STALL_WORSE <= imp < STALL_REL)


def _whole_run_levels(run: RunData, values, source: str) -> tuple[float, float, str]:
    """``(start, end, basis)`` of the whole-run stall test (see module docstring)."""
    if source == C.PER_BATCH_SOURCE:
        epoch = run.scalars.get("epoch_loss")
        e = epoch.values[np.isfinite(epoch.values)] if epoch is not None else np.zeros(0)
        if e.size >= EPOCH_POINTS:
            return float(e[0]), float(e[-1]), "first and last epoch_loss"
    return R.level(values), R.level(values, at_end=True), "first and last 10%"


def oscillation(values) -> dict | None:
    """Oscillation test on finite loss values (see module docstring)."""
    x = np.asarray(values, dtype=np.float64)
    half = x[x.size // 2:]
    if half.size < OSC_MIN_HALF:
        return None
    prog = improvement(half, 0.25)
    med = float(np.median(half))
    if not med > 0 or not np.isfinite(prog) or prog >= OSC_PROGRESS:
        return None
    amp = float((np.percentile(half, 90) - np.percentile(half, 10)) / med)
    if amp < OSC_AMPLITUDE:
        return None
    lag1 = R.autocorr(half, 1)
    lags = range(2, min(50, half.size // 4) + 1)
    acf = {lag: R.autocorr(half, lag) for lag in lags}
    best_lag = max(acf, key=lambda lag: acf[lag]) if acf else None
    periodic = acf[best_lag] if best_lag else float("nan")
    if not (lag1 <= OSC_LAG1 or periodic >= OSC_PERIODIC):
        return None
    return {"progress": prog, "amplitude": amp, "lag1_autocorr": lag1,
            "period": 2 if lag1 <= OSC_LAG1 else best_lag, "periodic_autocorr": periodic}


def _loss(run: RunData):
    loss, source = C.loss_series(run)
    if loss is None:
        return None, None, None, source
    ok = np.isfinite(loss.values)
    return loss, loss.steps[ok], loss.values[ok], source


def _median_kernel_update(run: RunData, after_step=None) -> float | None:
    m = run.variables.get("update_ratio")
    if m is None or not len(m):
        return None
    cols = C.weight_columns(m)
    rows = np.arange(len(m) // 10, len(m)) if after_step is None else np.flatnonzero(m.steps >= after_step)
    if not rows.size:
        return None
    values = m.values[np.ix_(rows, cols)]
    if C.accumulation_steps(run) > 1:  # micro-steps without an update are not measurements
        values = np.where(values == 0.0, np.nan, values)
    v = R.median(values)
    return v if np.isfinite(v) else None


def detect_divergence(run: RunData) -> list[Finding]:
    """divergence adapter."""
    loss, steps, values, source = _loss(run)
    if loss is None:
        return []
    d = divergence(values)
    early = blowup.finding(run, steps, values, source)
    if early is not None and (d is None or early.severity == "critical"):
        return [early]  # a run that blew up and never recovered: the blow-up is the story
    if d is None:
        rise = epoch_curve.rise_finding(run)  # a per-epoch loss too smooth for the test above
        return [rise] if rise is not None else []
    ends_nonfinite = not np.isfinite(loss.values[-1])
    severity = "critical" if d["ratio"] >= BLOWUP or ends_nonfinite else "warning"
    onset = int(steps[d["onset"]])
    lr = C.lr_at(run, onset)
    settings = gradients.remedy_settings(run)
    factor = settings.lr_factor
    lr_txt = f"{C.round_sig(lr / factor):g}" if lr else "1e-4"
    clip = f", {remedies.clip_args(run, settings.clipnorm)}"
    return [Finding(
        kind="divergence",
        severity=severity,
        run=run.name,
        first_step=onset,
        last_step=int(loss.steps[-1]),
        evidence={
            "source": source,
            "best_loss": d["best"],
            "best_step": int(steps[d["best_index"]]),
            "final_loss": d["final"],
            "ratio_final_to_best": d["ratio"],
            "ends_nonfinite": ends_nonfinite,
            "learning_rate": C.num(lr),
            "threshold": f"smoothed final >= {RISE:g}x best (and beyond the loss's own noise) and "
            f"> {SUSTAIN:g}x best over the last 10% of points; critical at >= {BLOWUP:g}x or "
            "non-finite",
        },
        explanation=(
            f"The loss rose from its best {C.fmt(d['best'])} (step {int(steps[d['best_index']])}) to "
            f"{C.fmt(d['final'])} ({C.fmt(d['ratio'])}x) and stayed there: training is diverging."
        ),
        remedy=(
            f"Lower the learning rate {factor:g}x (or decay it) and clip gradients:\n"
            f"    optimizer = {remedies.optimizer_call(run, f'learning_rate={lr_txt}{clip}')}\n"
            "    keras.callbacks.ReduceLROnPlateau(monitor='loss', factor=0.5, patience=2)"
        ),
    )]


def detect_stalled(run: RunData) -> list[Finding]:
    """stalled adapter."""
    loss, steps, values, source = _loss(run)
    if loss is None or values.size < MIN_POINTS:
        return []
    start, end, basis = _whole_run_levels(run, values, source)
    imp = relative_improvement(start, end)
    upd = _median_kernel_update(run)
    first = int(steps[0])
    whole = _no_progress(imp) and (upd is None or upd < STALL_UPDATE)
    still = None  # the per-epoch loss frozen in place, where no update ratios say so
    if not whole:
        half = values[values.size // 2:]
        first = int(steps[values.size // 2])
        imp = improvement(half)
        upd = _median_kernel_update(run, first)
        start, end = R.level(half), R.level(half, at_end=True)
        basis = "first and last 10% of the second half"
        if upd is None:
            still = epoch_curve.frozen(run)
        if not ((half.size >= MIN_POINTS or still is not None) and _no_progress(imp)
                and (still is not None or upd is not None and upd < FROZEN)
                and abs(end) > 1e-3 * abs(start)):
            return []
    if _diverges(run, values):
        return []  # reported as divergence, with the opposite remedy
    lr = C.lr_at(run, None)
    factor = C.round_sig(1e-3 / upd, 1) if upd else 10.0
    factor = float(min(max(factor, 10.0), 1e4))
    new_lr, factor = remedies.raised_learning_rate(lr, factor)
    noise = _noise_drop(values)
    overshooting = upd is None and (imp < -WORSE_REL or noise is not None)
    clipped = remedies.tight_clipping_remedy(run)
    if overshooting:
        remedy = (
            "Lower the learning rate ~10x and retrain from a fresh initialisation: a loss that "
            "rises or bounces without progress is the steps overshooting (a rate too small gives "
            "a smooth, slow descent), and check that labels match the inputs:\n"
            f"    optimizer = {remedies.lowered_optimizer_call(run, 10.0)}"
        )
    elif clipped is not None:
        remedy = clipped
    elif new_lr is None:
        remedy = (f"The learning rate is already {lr:g}, so updates this small mean the "
                  f"gradients are (near) zero: {remedies.zero_gradient_causes(run)}")
    else:
        raise_by = f"~{factor:g}x " if factor is not None else "(it is unknown; e.g. 1e-3) "
        remedy = (
            f"Raise the learning rate {raise_by}(update/weight ratios near 1e-3 are healthy)"
            f"{remedies.or_adaptive(run)}; check that labels match the inputs and the layers are "
            "trainable:\n"
            f"    optimizer = {remedies.optimizer_call(run, f'learning_rate={new_lr:g}')}"
        )
    return [Finding(
        kind="stalled",
        severity="warning",
        run=run.name,
        first_step=first,
        last_step=int(steps[-1]),
        evidence={
            "source": source,
            "since_step": first,
            "start_level": start,
            "end_level": end,
            "levels_from": basis,
            "relative_improvement": imp,
            "relative_spread_first_last": None if noise is None else list(noise),
            "epoch_loss_relative_range": None if still is None else still["relative_range"],
            "median_kernel_update_ratio": C.num(upd),
            "learning_rate": C.num(lr),
            "threshold": f"improvement < {STALL_REL:.0%} between first and last 10% and median "
            f"update ratio < {STALL_UPDATE:g} when logged; or second half < {STALL_REL:.0%} "
            f"with update ratio < {FROZEN:g}, or without update ratios a per-epoch loss within "
            f"{epoch_curve.FLAT:g} of its level",
        },
        explanation=(
            (f"The loss got {-imp:.2%} worse since step {first} ({C.fmt(start)} to {C.fmt(end)})"
             if imp < 0 else f"The loss improved only {imp:.2%} since step {first}")
            + (f" and the weights move {C.fmt(upd)} of their norm per step" if upd is not None else "")
            + (f", and its per-epoch mean has stayed {_held(still)} since step "
               f"{still['since_step']}, so the weights no longer move (all units dead, or "
               "outputs pinned)" if still is not None else "")
            + ": training is not making progress"
            + (f". The loss was {C.fmt(noise[0] / noise[1])}x noisier in the first 10% than in "
               f"the last (relative spread {noise[0]:.1%} against {noise[1]:.1%}): it bounced, "
               "then settled where it started" if noise is not None else "")
            + (", so the learning rate is more likely too large than too small." if overshooting
               else ".")
        ),
        remedy=remedy,
    )]


def detect_oscillation(run: RunData) -> list[Finding]:
    """oscillation adapter."""
    loss, steps, values, source = _loss(run)
    if loss is None:
        return []
    o = oscillation(values)
    if o is None:
        return []
    if _diverges(run, values):
        return []  # a rising or blown-up curve is reported as divergence
    lr = C.lr_at(run, None)
    lr_txt = f"{C.round_sig(lr / 10):g}" if lr else "1e-4"
    half = steps[steps.size // 2:]
    return [Finding(
        kind="oscillation",
        severity="warning",
        run=run.name,
        first_step=int(half[0]),
        last_step=int(half[-1]),
        evidence={"source": source, **o, "learning_rate": C.num(lr),
                  "threshold": f"progress < {OSC_PROGRESS:.0%}, (q90-q10)/median >= {OSC_AMPLITUDE:g}, "
                  f"lag-1 autocorr <= {OSC_LAG1:g} or periodic autocorr >= {OSC_PERIODIC:g}"},
        explanation=(
            f"In the second half of the run the loss swings by {C.fmt(o['amplitude'])}x its median "
            f"(period ~{o['period']} points) without improving: the steps overshoot the minimum."
        ),
        remedy=(
            "Lower the learning rate (10x) or decay it, and/or use larger batches:\n"
            f"    optimizer = {remedies.optimizer_call(run, f'learning_rate={lr_txt}')}\n"
            "    keras.callbacks.ReduceLROnPlateau(monitor='loss', factor=0.3, patience=2)"
        ),
    )]
