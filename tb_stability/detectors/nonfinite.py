"""nan_inf: the first non-finite loss, gradient, weight or activation.

Rule: the onset is the earliest step at which any of these holds:
per-step loss or global gradient norm is NaN/Inf, or ``nonfinite_grads > 0``
(per-step signals, so no step is missed); a per-variable gradient/weight/update
norm or a per-layer activation statistic is non-finite (every N steps); an
ordinary scalar (e.g. ``epoch_loss``) is non-finite; or the instrumentation's
``stability/nan_origin`` record. Keras' ``epoch_*`` scalars are indexed by
epoch, not step, so they are left out where a run also logs per step (the
instrumentation's columns, ``batch_*`` scalars, or the validation run's
``evaluation_*_vs_iterations``). Threshold: any single non-finite value.
The variables named are those whose gradient (else weight) norm is non-finite
at the nearest per-variable record at or after the onset (else before it).

Severity: always ``critical`` (training cannot recover from NaN weights).

Dynamic loss scaling (a ``skipped`` step column, mixed precision): a step the
LossScaleOptimizer skipped because its *scaled* gradients overflowed, with a
finite loss, is normal and is not an onset (its non-finite gradient norm,
``nonfinite_grads`` and per-variable gradient norms are ignored). Skipping
becomes nan_inf when it persists (>= ``MAX_CONSECUTIVE_SKIPS`` consecutive
skipped steps) or the loss scale has reached ``LOSS_SCALE_FLOOR`` (then the
unscaled gradients themselves overflow), or of course when the loss itself is
non-finite. Benign skips are reported as an ``info`` nan_inf finding (or as
evidence of the critical one) with their count.

With a ``nonfinite_replicas`` column (``tf.distribute``; bit r = replica r),
the replicas non-finite at the onset and the first replicas to go non-finite
are decoded into replica ids.

The remedy depends on what went first: a non-finite loss with healthy gradients
before it points at the loss computation (log of 0, division); gradients that
grew >= 10x before the onset, or non-finite gradients with a finite loss, point
at an exploding update (clipnorm, lower learning rate). Without that growth, a
forensic re-run that found the first NaN/Inf in one layer's output, or in the
loss on finite outputs, decides: that computation made it from finite values,
and the remedy guards it (`_nonfinite_causes`: a custom loss is named, a
linear output it takes the log of is told to stay positive, input features
constant over the batch are named as a 0/0 of a standardisation). Where the forensic
re-run found the NaN/Inf in the batch itself (``origin`` ``inputs``,
``labels`` or ``sample_weights``), that decides: no update caused it, so the
remedy cleans the data, naming the arrays that hold it
(`_data_remedies.data_remedy`), even when the gradients went first (a ReLU
can drop a NaN input on the forward pass while the first layer's gradient
keeps it).
"""

from __future__ import annotations

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.detectors import _data_remedies as D
from tb_stability.detectors import _nonfinite_causes as causes
from tb_stability.detectors import _remedies as remedies
from tb_stability.detectors import gradients
from tb_stability.detectors._loss_scale import (  # noqa: F401 - re-exported for the instrumentation
    LOSS_SCALE_FLOOR,
    MAX_CONSECUTIVE_SKIPS,
    decode_replicas,
    loss_scale_skips,
    skip_runs,
    skips_finding,
)
from tb_stability.findings import Finding
from tb_stability.rundata import Matrix, RunData

GROWTH_BEFORE_ONSET = 10.0  # pre-onset gradient growth that blames the update
LOOKBACK = gradients.NONFINITE_LOOKBACK  # steps before the onset examined for growth


def _without_steps(steps, values, drop: set[int], fill: float):
    """``values`` with the entries at ``drop`` steps replaced by ``fill``."""
    values = np.asarray(values, dtype=np.float64)
    if not drop:
        return values
    mask = np.isin(np.asarray(steps, dtype=np.int64), np.fromiter(drop, np.int64))
    return np.where(mask, fill, values)


def first_nonfinite(steps, values) -> int | None:
    """Step of the first non-finite value of a series, or None."""
    values = np.asarray(values, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    return int(np.asarray(steps)[bad[0]]) if bad.size else None


def last_nonfinite(steps, values) -> int | None:
    """Step of the last non-finite value of a series, or None."""
    values = np.asarray(values, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    return int(np.asarray(steps)[bad[-1]]) if bad.size else None


def first_positive(steps, values) -> int | None:
    """Step of the first value > 0 (e.g. ``nonfinite_grads``), or None."""
    values = np.asarray(values, dtype=np.float64)
    bad = np.flatnonzero(values > 0)
    return int(np.asarray(steps)[bad[0]]) if bad.size else None


def nonfinite_columns(m: Matrix, step: int) -> tuple[int | None, list[str]]:
    """Names with a non-finite value at the record of ``m`` nearest to ``step``.

    Records at or after ``step`` are preferred (the first with any non-finite
    value); otherwise the latest earlier record with a non-finite value. A
    value not recorded (``m.missing``) is not non-finite.

    Returns:
      ``(record_step, names)`` in column (model) order, or ``(None, [])``.
    """
    if np.ndim(m.values) != 2 or not len(m):
        return None, []
    bad = m.nonfinite()
    steps = np.asarray(m.steps)
    rows = np.flatnonzero(bad.any(axis=1))
    if not rows.size:
        return None, []
    after = rows[steps[rows] >= step]
    row = int(after[0]) if after.size else int(rows[-1])
    return int(steps[row]), [m.names[j] for j in np.flatnonzero(bad[row])]


def _per_step_tag(tag: str) -> bool:
    """Keras' scalars indexed by step: ``batch_*`` (train) and ``evaluation_*_vs_iterations``."""
    name = tag.rsplit("/", 1)[-1]
    return name.startswith("batch_") or (name.startswith("evaluation_")
                                          and name.endswith("_vs_iterations"))


def _epoch_tag(tag: str) -> bool:
    """Keras' ``epoch_*`` scalars, indexed by epoch rather than by step."""
    return tag.rsplit("/", 1)[-1].startswith("epoch_")


def grad_growth_before(steps, grad, onset: int, lookback: int = LOOKBACK) -> tuple[float, float]:
    """Median finite grad norm before ``onset`` and max/median growth in the lookback.

    Returns:
      ``(healthy_median, growth)``; NaN when there is no finite history.
    """
    steps = np.asarray(steps)
    grad = np.asarray(grad, dtype=np.float64)
    before = grad[(steps < onset) & np.isfinite(grad)]
    if not before.size:
        return float("nan"), float("nan")
    healthy = gradients.level_before_nonfinite(before, lookback)
    recent = before[-lookback:]
    growth = float(np.max(recent) / healthy) if healthy > 0 else float("inf")
    return healthy, growth


def _matrix_onset(m: Matrix | None) -> int | None:
    if m is None or not len(m):
        return None
    rows = np.flatnonzero(m.nonfinite().any(axis=1))
    return int(m.steps[rows[0]]) if rows.size else None


def detect(run: RunData) -> list[Finding]:
    """nan_inf adapter over `RunData` (see module docstring)."""
    benign, skips = loss_scale_skips(run)
    candidates: dict[str, int] = {}
    lasts: list[int] = []
    for col in ("loss", "grad_norm"):
        s = run.steps.get(col)
        if s is not None and len(s):
            values = _without_steps(s.steps, s.values, benign, 0.0) if col == "grad_norm" else s.values
            k = first_nonfinite(s.steps, values)
            if k is not None:
                candidates[f"steps:{col}"] = k
                lasts.append(last_nonfinite(s.steps, values))
    s = run.steps.get("nonfinite_grads")
    if s is not None and len(s):
        values = _without_steps(s.steps, s.values, benign, 0.0)
        k = first_positive(s.steps, values)
        if k is not None:
            candidates["steps:nonfinite_grads"] = k
            lasts.append(int(s.steps[np.flatnonzero(values > 0)[-1]]))
    if "first_persistent_skip_step" in skips or "first_skip_at_floor_step" in skips:
        candidates["steps:skipped"] = min(
            skips.get(k, 1 << 62) for k in ("first_persistent_skip_step", "first_skip_at_floor_step")
        )
        lasts.append(skips["last_skipped_step"])
    for group, mats in (("variables", run.variables), ("layers", run.layers)):
        for q, m in mats.items():
            if group == "variables" and benign and m is not None and len(m):
                keep = ~np.isin(m.steps, np.fromiter(benign, np.int64))
                m = m.rows(keep)
            k = _matrix_onset(m)
            if k is not None:
                candidates[f"{group}:{q}"] = k
                lasts.append(int(m.steps[np.flatnonzero(m.nonfinite().any(axis=1))[-1]]))
    per_step = bool(run.steps) or any(_per_step_tag(t) for t in run.scalars)
    for tag, s in run.scalars.items():
        if per_step and _epoch_tag(tag):
            continue  # indexed by epoch, not by step: the per-step values are exact
        k = first_nonfinite(s.steps, s.values)
        if k is not None:
            candidates[f"scalar:{tag}"] = k
            lasts.append(last_nonfinite(s.steps, s.values))
    origin_records = [r for r in run.json.get("stability/nan_origin") or [] if int(r[0]) not in benign]
    origin = None
    if origin_records:
        o_step, origin = min(origin_records, key=lambda r: r[0])
        candidates["stability/nan_origin"] = int(o_step)
    if not candidates:
        return [skips_finding(run, skips)] if skips else []

    onset = min(candidates.values())
    signals = sorted(k for k, v in candidates.items() if v == onset)
    last = max([onset] + lasts)

    names: list[str] = []
    record_step = None
    for q in ("grad_norm", "weight_norm", "update_ratio"):
        m = run.variables.get(q)
        if m is not None and len(m):
            record_step, names = nonfinite_columns(m, onset)
            if names:
                break
    # The recorded origin (forensic re-run of the step) is more precise than
    # "every variable went NaN afterwards": it leads the list.
    if isinstance(origin, dict):
        for key in ("layer", "layers", "variables", "variable"):
            v = origin.get(key)
            if v:
                first = [v] if isinstance(v, str) else [str(x) for x in v]
                names = first + [n for n in names if n not in first]
                break

    grad = C.global_grad_norm(run)
    healthy, growth = (float("nan"), float("nan"))
    recent = 0  # finite grad norms in the lookback before the onset
    if grad is not None:
        healthy, growth = grad_growth_before(grad.steps, grad.values, onset)
        finite_before = (np.asarray(grad.steps) < onset) & np.isfinite(grad.values)
        recent = int(min(LOOKBACK, np.count_nonzero(finite_before)))
    loss = run.steps.get("loss")
    loss_at = C.value_at(loss, onset)
    grad_at = C.value_at(run.steps.get("grad_norm"), onset)
    loss_first = loss_at is not None and not np.isfinite(loss_at) and (
        grad_at is None or not np.isfinite(grad_at)
    )
    grads_first = "steps:grad_norm" in signals or "steps:nonfinite_grads" in signals
    grads_first = grads_first and (loss_at is None or np.isfinite(loss_at))
    grew = bool(np.isfinite(growth) and growth >= GROWTH_BEFORE_ONSET)
    origin_kind = origin.get("origin") if isinstance(origin, dict) else None
    # A forward pass that made NaN from finite values (a layer's op, or the
    # loss on finite outputs) with no growth before it: no update caused it,
    # even where the loss hid the NaN (Keras' crossentropy clips its input).
    computed = not grew and (
        (origin_kind == "layer" and origin.get("layer")) or origin_kind == "loss")
    loss_first = loss_first or (computed and origin_kind == "loss")
    exploding = grew or (grads_first and not computed)

    evidence = {
        "onset_step": onset,
        "signals_at_onset": signals,
        "first_nonfinite_by_signal": candidates,
        "loss_at_onset": C.num(loss_at),
        "grad_norm_at_onset": C.num(grad_at),
        "nonfinite_grads_at_onset": C.num(C.value_at(run.steps.get("nonfinite_grads"), onset)),
        "healthy_grad_norm_median": C.num(healthy),
        f"grad_growth_in_{LOOKBACK}_steps_before": C.num(growth),
        "nonfinite_variables": names,
        "variable_record_step": record_step,
        "threshold": "any NaN/Inf value, or nonfinite_grads > 0; "
        f"update blamed when grad norm grew >= {GROWTH_BEFORE_ONSET:g}x before onset",
    }
    if origin is not None:
        evidence["origin"] = origin
    if skips:
        evidence["loss_scale_skips"] = skips
    replicas_txt = ""
    rep = run.steps.get("nonfinite_replicas")
    if rep is not None and len(rep):
        at_onset = decode_replicas(C.value_at(rep, onset))
        rows = [i for i in np.flatnonzero(np.nan_to_num(rep.values) > 0)
                if int(rep.steps[i]) not in benign]
        evidence["nonfinite_replicas_at_onset"] = at_onset
        if rows:
            first_rep_step = int(rep.steps[rows[0]])
            first_reps = decode_replicas(rep.values[rows[0]])
            evidence["first_nonfinite_replicas"] = first_reps
            evidence["first_nonfinite_replicas_step"] = first_rep_step
            label = "Replica" if len(first_reps) == 1 else "Replicas"
            replicas_txt = (
                f" {label} {', '.join(str(r) for r in first_reps)} went non-finite first "
                f"(step {first_rep_step})."
            )
    clipping = remedies.configured_clipping(run)
    if clipping:
        evidence["configured_clipping"] = clipping

    where = f" in {', '.join(names[:5])}" if names else ""
    # A run with only Keras' epoch scalars counts its steps in epochs.
    epoch_indexed = all(sig.startswith("scalar:") and _epoch_tag(sig[len("scalar:"):])
                        for sig in signals)
    at = f"epoch {onset}" if epoch_indexed else f"step {onset}"
    what = ", ".join(signals)
    origin_told = False  # the explanation already leads with the origin
    data_origin = isinstance(origin, dict) and origin.get("origin") in D.GENERIC
    if data_origin:
        # The batch itself holds the NaN/Inf: no update caused it, whatever the
        # gradients did. Say so first (the live warning shows the first sentence).
        remedy = D.data_remedy(origin)
        explanation = (f"{causes.origin_sentence(origin)} Values became non-finite at {at} "
                       f"({what}).")
        if grads_first and origin["origin"] == "inputs":
            explanation += (" The loss stayed finite (a ReLU or max-pooling can drop a NaN on the "
                            "forward pass), but the gradient of the first layer multiplies the "
                            "raw inputs.")
        origin_told = True
    elif exploding:
        settings = gradients.remedy_settings(run)
        level = settings.healthy_norm or (
            healthy if np.isfinite(healthy) and healthy > 0 else None)
        clip = C.round_sig(2 * level) if level else 1.0
        factor = settings.lr_factor
        lr = C.lr_at(run, onset)
        lr_txt = f"{C.round_sig(lr / factor, 2):g}" if lr else "1e-4"
        explanation = (
            f"Values became non-finite at {at} ({what}){where}. "
            + (f"The gradient norm grew {C.fmt(growth)}x over the {recent} recorded steps "
               "before, so an exploding update overflowed the weights."
               if np.isfinite(growth) and growth >= GROWTH_BEFORE_ONSET
               else "The gradients turned non-finite while the loss was still finite: the "
                    "backward pass overflowed.")
        )
        if clipping:
            remedy = (
                f"Gradients are already clipped ({remedies.clip_text(clipping)}), so lower the "
                f"learning rate {factor:g}x and look for the op producing Inf/NaN (clipping "
                "cannot repair a non-finite gradient):\n"
                f"    optimizer = {remedies.optimizer_call(run, f'learning_rate={lr_txt}, {remedies.clip_text(clipping)}')}\n"
                "    tf.debugging.enable_check_numerics()  # before building the model\n"
                "Add `keras.callbacks.TerminateOnNaN()` to stop at the first NaN."
            )
        else:
            clip_txt = (f"Clip gradients at about 2x the healthy norm ({C.fmt(level)})" if level
                        else "Clip gradients (no finite norm was recorded before: start at 1)")
            remedy = (
                f"{clip_txt} and lower the learning rate {factor:g}x:\n"
                f"    optimizer = {remedies.optimizer_call(run, f'learning_rate={lr_txt}, clipnorm={clip:g}')}\n"
                "Add `keras.callbacks.TerminateOnNaN()` to stop at the first NaN."
            )
    elif origin_kind == "layer" and origin.get("layer"):
        explanation, remedy = causes.layer_texts(run, origin, at, what, np.isfinite(growth))
        origin_told = True
    elif loss_first:
        explanation, remedy = causes.loss_texts(run, at, growth, np.isfinite(growth))
    else:
        explanation = f"Values became non-finite at {at} ({what}){where}."
        clip_or_kept = remedies.clip_args(run, gradients.remedy_settings(run).clipnorm)
        remedy = (
            "Find the producing op with `tf.debugging.enable_check_numerics()` before "
            "building the model, check inputs for NaN/Inf, and guard logs/divisions:\n"
            "    p = tf.clip_by_value(p, 1e-7, 1.0)\n"
            f"    optimizer = {remedies.lowered_optimizer_call(run, 10.0, clip_or_kept)}"
        )
    if isinstance(origin, dict) and origin and not origin_told:
        explanation += f" {causes.origin_sentence(origin)}"
    explanation += replicas_txt
    if "steps:skipped" in signals:
        explanation += (
            f" The LossScaleOptimizer kept skipping updates ({skips['max_consecutive_skipped']} "
            f"in a row; loss scale down to {C.fmt(skips['loss_scale_min'])}): the unscaled "
            "gradients themselves overflow."
        )
    return [
        Finding(
            kind="nan_inf",
            severity="critical",
            run=run.name,
            first_step=onset,
            last_step=last,
            layers=names,
            evidence=evidence,
            explanation=explanation,
            remedy=remedy,
        )
    ]

