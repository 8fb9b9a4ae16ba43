"""update_ratio_high and update_ratio_low: |update| / |weight| per step.

Signal: per-variable ``update_ratio`` records of kernel-like variables
(biases and normalisation offsets start at zero, so their ratio is
meaningless early; they are excluded). About 1e-3 is healthy (CS231n);
DeepDiagnosis flags outside [1e-5, 1e-1].

update_ratio_high
  A kernel's median ratio (over its records) is > ``HIGH`` (1e-1), or any
  single record is > ``PEAK`` (1.0: one step moved the weights by more than
  their own norm). Severity: ``warning``; onset: first record above ``HIGH``.

update_ratio_low
  A kernel's median ratio over the records after the first 10% is < ``LOW``
  (1e-5), and the kernel was never flagged high (a kernel that blew up and
  then died is not "learning rate too low"); or a kernel gets a gradient of
  exactly 0 in every record (not connected to the loss, behind dead units,
  or initialised to zero: `_zero_init`, which then gives the explanation and
  the remedy). Severity: ``warning``, ``critical`` when no kernel of the model
  gets a gradient (nothing can learn).

Gradient accumulation (run_info's optimizer config has
``gradient_accumulation_steps`` k > 1): the weights move only every k-th step,
so exact-zero ratios are missing values, not "too low", and are ignored.

The remedy scales the learning rate by the measured factor
``1e-3 / median ratio`` (clipped to [1e-4, 1e4]; a raised rate is capped at
1e-2, beyond which a tiny ratio means no gradient rather than a low rate).
"""

from __future__ import annotations

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.detectors import _lr_decay
from tb_stability.detectors import _remedies as remedies
from tb_stability.detectors import _update_ratios as U
from tb_stability.detectors import _zero_init
from tb_stability.detectors import gradients
from tb_stability.detectors._update_ratios import HEALTHY, HIGH, PEAK, high_columns, ratio_summary
from tb_stability.findings import Finding
from tb_stability.rundata import RunData

LOW = 1e-5

__all__ = ["HEALTHY", "HIGH", "LOW", "PEAK", "detect", "high_columns", "low_columns", "ratio_summary"]


def low_columns(values, low: float = LOW) -> list[int]:
    """Columns whose median (after the first 10% of rows) < ``low``."""
    v = np.asarray(values, dtype=np.float64)
    med, _ = ratio_summary(v[v.shape[0] // 10:])
    return [j for j in range(med.size) if np.isfinite(med[j]) and med[j] < low]


def _cut_note(measured: float, cut: float) -> str:
    """Why the suggested cut is not ``measured / HEALTHY`` where it differs."""
    full = measured / HEALTHY
    if full <= cut * 1.5:
        return f" to bring the ratio near {HEALTHY:g}"
    return (f" (the ratio is {C.fmt(full)}x the healthy {HEALTHY:g}; cut at most {cut:g}x at once, "
            "then re-measure)")


def _lr_factor(ratio: float) -> float:
    return float(np.clip(HEALTHY / ratio, 1e-4, 1e4)) if ratio > 0 else 1e4


def detect(run: RunData) -> list[Finding]:
    """update_ratio_high / update_ratio_low adapter."""
    ratios = U.kernel_ratios(run)
    if ratios is None:
        return []
    names, sub = ratios.names, ratios.values
    med, mx = ratio_summary(sub)
    out = []
    lr = C.lr_at(run, None)
    high = U.high_ratios(ratios)
    hi = high.columns if high else []
    if high:
        worst = high.worst
        settings = gradients.remedy_settings(run)  # the cut every remedy of this run names
        cut = settings.lr_factor
        lr0 = C.lr_at(run, high.first_step)
        new_lr = f"{C.round_sig(lr0 / cut):g}" if lr0 else "1e-3"
        clip = settings.clipnorm or 1.0
        out.append(Finding(
            kind="update_ratio_high",
            severity="warning",
            run=run.name,
            first_step=high.first_step,
            last_step=high.last_step,
            layers=[names[j] for j in hi],
            evidence={
                "median_ratio": {names[j]: float(med[j]) for j in hi},
                "max_ratio": {names[j]: float(mx[j]) for j in hi},
                "learning_rate": C.num(lr0),
                "threshold": f"median > {HIGH:g} or any record > {PEAK:g} (healthy ~{HEALTHY:g})",
            },
            explanation=(
                f"Each step changes {names[worst]} by up to {C.fmt(mx[worst])}x its norm "
                f"(median {C.fmt(med[worst])}); healthy is about {HEALTHY:g}. The learning rate is too high."
            ),
            remedy=(
                f"Lower the learning rate ~{cut:g}x{_cut_note(high.measured, cut)}:\n"
                f"    optimizer = {remedies.optimizer_call(run, f'learning_rate={new_lr}, clipnorm={clip:g}')}"
            ),
        ))
    unconnected = C.no_gradient_variables(run)
    zero = [j for j in range(len(names)) if names[j] in unconnected and j not in hi]
    lo = [j for j in low_columns(sub) if j not in hi and j not in zero]  # blown up then dead is not "too low"
    if lo or zero:
        out.append(_low_finding(run, ratios, names, med, lo, zero, lr))
    return out


def _raise_remedy(run: RunData, lr, typical: float) -> str:
    """Raise the learning rate by the measured factor, or say why raising it is not the fix."""
    new_lr, factor = remedies.raised_learning_rate(lr, _lr_factor(typical))
    if new_lr is None:
        return (f"The learning rate is already {lr:g}, so ratios this small mean these "
                f"layers get (near) zero gradients: {remedies.zero_gradient_causes(run)}")
    capped = f", capped at {remedies.MAX_SUGGESTED_LR:g}" if new_lr >= remedies.MAX_SUGGESTED_LR else ""
    measured = f"measured ratio {C.fmt(typical)}, healthy ~{HEALTHY:g}{capped}"
    raise_by = f"~{factor:g}x ({measured})" if factor is not None else f"(it is unknown; {measured})"
    return (f"Raise the learning rate {raise_by}{remedies.or_adaptive(run)}:\n"
            f"    optimizer = {remedies.optimizer_call(run, f'learning_rate={new_lr:g}')}")


def _low_finding(run: RunData, m: U.KernelRatios, names, med, lo: list[int], zero: list[int], lr) -> Finding:
    """update_ratio_low for kernels that barely move (``lo``) or get no gradient (``zero``)."""
    explanation, remedy = [], []
    evidence = {}
    if lo:
        typical = float(np.nanmedian(med[lo]))
        evidence["median_ratio"] = {names[j]: float(med[j]) for j in lo}
        moved = f"{len(lo)} of {len(names)} kernels change by only {C.fmt(typical)} of their norm per step"
        decay = _lr_decay.decayed(run)
        clipped = remedies.tight_clipping_remedy(run)
        if decay is not None:
            explanation.append(f"{moved}. {_lr_decay.explanation(run, decay)}")
            remedy.append(_lr_decay.remedy(run, decay))
            evidence.update({"learning_rate_peak": decay.peak, "learning_rate_peak_step": decay.peak_step,
                             "learning_rate_below_1pct_from_step": decay.stopped_step})
        elif clipped is not None:
            explanation.append(f"{moved}: the gradient clipping cuts every update down (below).")
            remedy.append(clipped)
        else:
            explanation.append(f"{moved}; the weights are barely moving, so the learning rate is too "
                               "low (or those layers get no gradient).")
            remedy.append(_raise_remedy(run, lr, typical))
    if zero:
        listed = ", ".join(names[j] for j in zero[:4]) + (", ..." if len(zero) > 4 else "")
        evidence["no_gradient"] = [names[j] for j in zero]
        explanation.append(
            f"{listed} get{'s' if len(zero) == 1 else ''} no gradient at all (exactly 0 at every "
            "recorded step), so no learning rate moves "
            f"{'it' if len(zero) == 1 else 'them'}.")
    zeros = _zero_init.zero_kernels(run) if zero else []
    if zeros:
        evidence["zero_kernels"] = zeros
        explanation.append(_zero_init.explanation(zeros, named=zeros != [names[j] for j in zero]))
        remedy.append(_zero_init.remedy(zeros))
    elif zero:
        remedy.append(
            f"{listed} {'is' if len(zero) == 1 else 'are'} not connected to the loss (a layer "
            "created but never called in call(), an output no loss uses, or a path through an "
            "integer cast, argmax or tf.stop_gradient), or every path from "
            f"{'it' if len(zero) == 1 else 'them'} to the loss runs through dead units (see "
            "dead_units). Call the layer, "
            "delete it, or freeze it on purpose:\n"
            "    layer.trainable = False")
    evidence.update({
        "kernels_low": len(lo) + len(zero),
        "kernels": len(names),
        "learning_rate": C.num(lr),
        "threshold": (f"median (after first 10% of records) < {LOW:g} (healthy ~{HEALTHY:g}), "
                      "or a gradient of exactly 0 in every record"),
    })
    return Finding(
        kind="update_ratio_low",
        severity="critical" if len(zero) == len(names) else "warning",  # nothing can learn
        run=run.name,
        first_step=int(m.steps[m.steps.size // 10]),
        last_step=int(m.steps[-1]),
        layers=[names[j] for j in lo + zero],
        evidence=evidence,
        explanation=" ".join(explanation),
        remedy="\n".join(remedy),
    )
