"""A loss that blows up in the first steps: reported as ``divergence``.

`trends.divergence` compares the end of a run with its best smoothed level,
and its smoothing leaves out the first points, so a loss that blows up in the
first steps and never gets below its first value again has no "best" to rise
from, and one that comes back down is not diverging at all. Yet both are the
signature of a learning rate too large for a freshly initialised model
(Adam at 0.2, RMSprop at 0.05 on a small MLP): the first updates throw the
weights far out, and the model either finds its way back or collapses to a
constant prediction at about its initial loss.

Rule: with ``x0`` the first finite loss (> 0) and at least ``MIN_POINTS`` (8)
finite values, a blow-up is a point within the first ``EARLY_FRACTION``
(20 %) of them at or above ``EARLY_RISE`` (5) times ``x0``. On healthy real
runs the first 20 % stay within about 2x ``x0`` (batch noise, Adam's first
steps); a learning rate 100x too large gives 15x to 10^9x. Two guards keep
out what is not a blow-up: the peak must also be ``EARLY_RISE`` times the
90th percentile of the run's second half (a per-batch loss under class
weights swings ~8x between batches with and without the rare class, every
epoch), unless the median of that half is itself ``EARLY_RISE`` times ``x0``
(a run that blew up and lives on, noisily, far above its start: a GRU at SGD
30 went from 0.69 to ~30 within 5 steps and swung between 13 and 106 for the
rest of the run), and the loss must stay above ``x0`` for more than `_spike_rule.MAX_LEN`
(3) points after the onset (one bad batch that comes straight back is a
``loss_spike``). And a single point of a very noisy series says nothing about
its level: where the loss's point-to-point noise (`_robust.log_noise`, in log
units) is at least ``NOISY`` (1.0: the per-sample loss of ``batch_size=1``
scatters by ~e^2 from step to step, batches of 32-64 by 0.1-0.3) in a run of
at least ``NOISY_MIN_POINTS`` (64), the test compares levels instead: ``x0``
is the median of the first ``NOISY_HEAD`` (9) points and the rest of the rule
reads the trailing median of 9. A blow-up from the very first update of such
a run lifts that first median too, so there ``x0`` is the first value where
that value is known to be a level: a cross-entropy whose first loss is within
``AT_BASE_RATE`` (2x) of the labels' entropy (`_common.label_entropy`: a fresh
classifier predicts about the class shares for every sample, so its first
per-sample losses barely scatter; a GRU at SGD 30 went from 0.693 to a level
of ~16 within 3 steps, 80% of its later points 10x above the first). Other
such blow-ups are left to `trends`. Either
way the peak must also be ``exp(NOISE_Z * s)`` (5) times ``x0``, with ``s``
the log-space spread of what is compared (a point, or a median of 9), which
is below ``EARLY_RISE`` for ordinary batch noise. What happens next decides
the outcome, with ``final`` the median of the last 10 %:

* ``recovered``: ``final < RECOVERED * x0`` (0.8): ``warning``; the remedy is
  a warm-up as long as the recovery took.
* ``stuck``: ``RECOVERED * x0 <= final < RISE * x0``: the model came back
  only to about where it started, so training achieved nothing after the
  blow-up: ``critical``.
* ``diverged``: ``final >= RISE * x0`` (2): ``critical``.
"""

from __future__ import annotations

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.detectors import _remedies as remedies
from tb_stability.detectors import _robust as R
from tb_stability.detectors import _spike_rule, gradients
from tb_stability.findings import Finding
from tb_stability.rundata import RunData

MIN_POINTS = 8
EARLY_FRACTION = 0.2
EARLY_RISE = 5.0
RECOVERED = 0.8
RISE = 2.0
MIN_WARMUP = 100
SETTLED_QUANTILE = 90
NOISE_Z = 5.0
NOISY = 1.0
NOISY_HEAD = 9
NOISY_MIN_POINTS = 64
AT_BASE_RATE = 2.0
MAX_SPIKE_LEN = _spike_rule.MAX_LEN


def early_blowup(values, base_rate: float | None = None) -> dict | None:
    """The early blow-up test on finite loss values (see module docstring).

    Args:
      values: The finite loss values, in step order.
      base_rate: The loss of predicting the class shares (`_common.label_entropy`),
        where the loss is a cross-entropy with recorded class counts. A freshly
        initialised classifier predicts about those shares for every sample, so
        its first loss is a level, not a noisy point: where the first value is
        within ``AT_BASE_RATE`` (2x) of it, a noisy run's ``x0`` is that first
        value when it is below the median of the first points (which a blow-up
        in the first steps lifts).

    Returns:
      None, or a dict with ``initial`` (``x0``), ``initial_points`` (how many
      points ``x0`` is the median of), ``level_points`` (the same for the
      levels compared with it), ``onset`` (the first index at or above
      ``EARLY_RISE * x0``), ``peak_index``, ``peak``, ``back_index`` (the first
      index after the peak at or below ``x0``; None when the loss never got
      back), ``final`` and ``outcome`` (``recovered``, ``stuck`` or
      ``diverged``).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size < MIN_POINTS:
        return None
    sigma = R.log_noise(x)
    head = NOISY_HEAD if x.size >= NOISY_MIN_POINTS and sigma >= NOISY else 1
    if head == 1:
        level = x
    else:  # single points say nothing: compare levels, the trailing median of ``head`` points
        level = R.rolling_median(x, head)
        level[: head - 1] = np.nan
    x0, initial_points = float(level[head - 1]), head
    if head > 1 and base_rate and x[0] < x0 and 1 / AT_BASE_RATE <= x[0] / base_rate <= AT_BASE_RATE:
        x0, initial_points = float(x[0]), 1  # a fresh classifier's first loss: a level
    if not x0 > 0:
        return None
    early = level[: max(head + 1, int(np.ceil(EARLY_FRACTION * x.size)))]
    with np.errstate(invalid="ignore"):
        above = np.flatnonzero(early >= EARLY_RISE * x0)
    if not above.size:
        return None
    onset = int(above[0])
    if initial_points < head:  # the lagging median confirms it; the points say where it began
        onset = int(np.flatnonzero(x[: onset + 1] >= EARLY_RISE * x0)[0])
    peak_index = int(np.nanargmax(early))
    peak = float(level[peak_index])
    settled = x[x.size // 2:]
    if (peak < EARLY_RISE * float(np.percentile(settled, SETTLED_QUANTILE))
            and float(np.median(settled)) < EARLY_RISE * x0):
        return None  # within the range of a run that stays near its start: batch noise
    if peak < x0 * R.noise_bound(sigma, NOISE_Z, points=head):
        return None  # two levels this far apart are the series' own noise (tiny batches)
    back = np.flatnonzero(level[peak_index + 1:] <= x0)
    back_index = peak_index + 1 + int(back[0]) if back.size else None
    if back_index is not None and back_index - onset <= MAX_SPIKE_LEN:
        return None  # a spike, straight back: `spikes`' to report (a bad batch)
    final = R.level(x, at_end=True)
    if final < RECOVERED * x0:
        outcome = "recovered"
    elif final < RISE * x0:
        outcome = "stuck"
    else:
        outcome = "diverged"
    return {
        "initial": x0,
        "initial_points": initial_points,
        "level_points": head,
        "onset": onset,
        "peak_index": peak_index,
        "peak": peak,
        "back_index": back_index,
        "final": final,
        "outcome": outcome,
    }


def finding(run: RunData, steps, values, source: str) -> Finding | None:
    """The ``divergence`` finding of an early blow-up of ``values`` (finite, at ``steps``), or None."""
    base_rate = C.label_entropy(run)
    b = early_blowup(values, base_rate)
    if b is None:
        return None
    x0, peak, final = b["initial"], b["peak"], b["final"]
    s0, onset, at_peak = int(steps[0]), int(steps[b["onset"]]), int(steps[b["peak_index"]])
    back = None if b["back_index"] is None else int(steps[b["back_index"]])
    ratio = peak / x0
    settings = gradients.remedy_settings(run)
    clip = settings.clipnorm or 1.0
    lr = C.lr_at(run, onset)
    initial_points = b["initial_points"]
    if b["level_points"] == 1:
        blew = (f"The loss blew up at step {onset}: from {C.fmt(x0)} at step {s0} to "
                f"{C.fmt(peak)} at step {at_peak} ({C.fmt(ratio)}x)")
    elif initial_points == 1:
        blew = (f"The loss blew up at step {onset}: from {C.fmt(x0)} at step {s0}, where a fresh "
                f"classifier starts (predicting the class shares costs {C.fmt(base_rate)}), to a "
                f"level of {C.fmt(peak)} at step {at_peak} ({C.fmt(ratio)}x; the median of "
                f"{b['level_points']} points, as single points of this loss are too noisy)")
    else:
        blew = (f"The loss blew up at step {onset}: its level (the median of {initial_points} points, "
                f"as single points of this loss are too noisy) went from {C.fmt(x0)} over its first "
                f"{initial_points} points to {C.fmt(peak)} at step {at_peak} ({C.fmt(ratio)}x)")
    if b["outcome"] == "recovered":
        warmup = max(MIN_WARMUP, int(C.round_sig(2 * ((back or at_peak) - s0), 1)))
        target = f"{lr:g}" if lr else "1e-3"
        severity = "warning"
        explanation = (
            f"{blew}, and took until step {back} to get back below where it started (it ended "
            f"at {C.fmt(final)}). The first updates were too large for the freshly initialised "
            "model; it recovered this time, but such a blow-up can also kill units or end in NaN."
        )
        remedy = (
            f"Warm the learning rate up over the first ~{warmup} steps (or lower it "
            f"{settings.lr_factor:g}x), and clip gradients:\n"
            + _warmed_up(run, target, warmup, clip, "" if lr else "  # your learning rate")
        )
    else:
        severity = "critical"
        if b["outcome"] == "stuck":
            explanation = (
                f"{blew}, and came back only to about where it started: it ended at "
                f"{C.fmt(final)}, against {C.fmt(x0)} at step {s0}, so training achieved nothing "
                "after the blow-up. Updates that large usually kill ReLU units or push the "
                "outputs to a constant prediction, and the model does not recover from that."
            )
        else:
            explanation = (
                f"{blew}, and never came back down: it ended at {C.fmt(final)}, "
                f"{C.fmt(final / x0)}x its first value: training is diverging."
            )
        rate, note = remedies.lowered_rate_for(run, lr, settings.lr_factor)
        remedy = (
            f"Retrain from a fresh initialisation with the learning rate {settings.lr_factor:g}x "
            "lower, warmed up, and clip gradients (these weights will not recover):\n"
            + _warmed_up(run, f"{rate:g}", MIN_WARMUP, clip, note)
        )
    return Finding(
        kind="divergence",
        severity=severity,
        run=run.name,
        first_step=onset,
        last_step=back if b["outcome"] == "recovered" and back is not None else int(steps[-1]),
        evidence={
            "source": source,
            "early_blowup": b["outcome"],
            "initial_loss": x0,
            "initial_step": s0,
            "peak_loss": peak,
            "peak_step": at_peak,
            "ratio_peak_to_initial": ratio,
            "back_below_initial_step": back,
            "final_loss": final,
            "ratio_final_to_initial": final / x0,
            **({"median_of_points": b["level_points"]} if b["level_points"] > 1 else {}),
            **({"label_entropy": base_rate} if initial_points < b["level_points"] else {}),
            "learning_rate": C.num(lr),
            "threshold": f"loss >= {EARLY_RISE:g}x its first value (and beyond its own "
            f"point-to-point noise) within the first {EARLY_FRACTION:.0%} of points; recovered "
            f"when the last 10% are < {RECOVERED:g}x it (warning), else critical",
        },
        explanation=explanation,
        remedy=remedy,
    )


def _warmed_up(run: RunData, target: str, warmup: int, clip: float, note: str = "") -> str:
    """The remedy's snippet: a schedule warmed up to ``target`` and the run's optimizer on it."""
    return (
        f"    lr = keras.optimizers.schedules.CosineDecay(0.0, decay_steps=total_steps, "
        f"warmup_target={target}, warmup_steps={warmup}){note}\n"
        f"    optimizer = {remedies.optimizer_call(run, f'learning_rate=lr, clipnorm={clip:g}')}"
    )
