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

The rule's arithmetic is in `_spike_rule`, the tests for where spikes sit (a
recurring phase, one batch every epoch, small batches) in `_spike_recurrence`;
this module turns their results into findings.
"""

from __future__ import annotations

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.detectors import _remedies as remedies
from tb_stability.detectors import _robust as R
from tb_stability.detectors import blowup, gradients
from tb_stability.detectors._spike_recurrence import (
    recurring_phase,
    same_batch_every_epoch,
    same_batch_remedy,
    small_batch_steps,
)
from tb_stability.detectors._spike_rule import (
    MAX_LEN,
    REL_JUMP,
    Z_THRESHOLD,
    classify,
    fill_spreads,
    flag_spikes,
    leave_out_spikes,
    window_for,
)
from tb_stability.findings import Finding
from tb_stability.rundata import RunData

HUGE_FACTOR = 10.0
MAX_LISTED = 10


def _outside_early_blowup(values, episodes: list, base_rate: float | None) -> list:
    """``episodes`` without the excursions (longer than ``MAX_LEN``) inside an early blow-up.

    A loss that blows up in its first steps and comes back is `blowup`'s
    ``divergence`` (with a warm-up remedy); the same points are not a spike too.
    """
    b = blowup.early_blowup(values, base_rate)
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
    spikes = _outside_early_blowup(values, spikes, C.label_entropy(run))
    fill_spreads(values, med, spread, score,
                 [i for a, b in spikes + ([final] if final else []) for i in range(a, b + 1)])
    if final is not None and index[final[1]] != len(loss) - 1:
        final = None  # the loss went non-finite afterwards: that is nan_inf
    if not spikes and final is None:
        return []
    flagged = [i for a, b in spikes + ([final] if final else []) for i in range(a, b + 1)]
    period = recurring_phase(values, flagged, steps)
    small = small_batch_steps(run, steps[flagged])
    where = C.epoch_positions(run, source, steps[flagged])
    same_batch = same_batch_every_epoch(period, where)
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
            ) + f"    optimizer = {remedies.optimizer_call(run, f'learning_rate=..., clipnorm={clip:g}')}\n"
        else:
            clip_line = ("Clip gradients (set clipnorm to ~2x the typical gradient norm):\n"
                         f"    optimizer = {remedies.optimizer_call(run, 'learning_rate=..., clipnorm=1.0')}\n")
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
                same_batch_remedy(same_batch, keras_log=source == C.PER_BATCH_SOURCE)
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
                f"    optimizer = {remedies.optimizer_call(run, f'learning_rate=lr, clipnorm={clip:g}')}\n"
                "    keras.callbacks.ModelCheckpoint('best.keras', monitor='loss', save_best_only=True)"
            ),
        ))
    return out
