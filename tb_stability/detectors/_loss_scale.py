"""Dynamic loss scaling and replicas: what the nan_inf detector must not mistake for NaN.

A step the LossScaleOptimizer skipped because its *scaled* gradients
overflowed, with a finite loss, is normal. Skipping becomes nan_inf when it
persists (>= `MAX_CONSECUTIVE_SKIPS` consecutive skipped steps) or the loss
scale has reached `LOSS_SCALE_FLOOR` (then the unscaled gradients themselves
overflow). The ``nonfinite_replicas`` column is a bit mask (bit r = replica r).
"""

from __future__ import annotations

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.findings import Finding
from tb_stability.rundata import RunData

MAX_CONSECUTIVE_SKIPS = 20  # loss-scale skips in a row that are no longer normal
LOSS_SCALE_FLOOR = 1.0  # a loss scale at or below this that still overflows is real


def decode_replicas(mask) -> list[int]:
    """Replica ids of a ``nonfinite_replicas`` bit mask (bit r = replica r)."""
    try:
        value = float(mask)
    except (TypeError, ValueError):
        return []
    if not np.isfinite(value) or value <= 0:
        return []
    bits = int(round(value))
    return [r for r in range(bits.bit_length()) if (bits >> r) & 1]


def skip_runs(skipped) -> np.ndarray:
    """Length of the run of consecutive skipped steps each step belongs to (0 if not skipped)."""
    sk = np.asarray(skipped, dtype=np.float64) >= 0.5
    out = np.zeros(sk.shape[0], dtype=np.int64)
    i = 0
    while i < sk.shape[0]:
        if not sk[i]:
            i += 1
            continue
        j = i
        while j < sk.shape[0] and sk[j]:
            j += 1
        out[i:j] = j - i
        i = j
    return out


def loss_scale_skips(run: RunData, max_run: int = MAX_CONSECUTIVE_SKIPS,
                     floor: float = LOSS_SCALE_FLOOR) -> tuple[set[int], dict]:
    """Benign loss-scaling skips of a run and a summary of all skipped steps.

    A skipped step is benign when its loss is finite, it belongs to fewer than
    ``max_run`` consecutive skipped steps and its loss scale is above ``floor``.

    Returns:
      ``(benign_steps, summary)``; summary is empty without a ``skipped`` column
      or skipped steps.
    """
    s = run.steps.get("skipped")
    if s is None or not len(s):
        return set(), {}
    steps = np.asarray(s.steps, dtype=np.int64)
    sk = np.asarray(s.values, dtype=np.float64) >= 0.5
    if not sk.any():
        return set(), {}
    loss = np.array([C.value_at(run.steps.get("loss"), int(k)) for k in steps], dtype=object)
    finite_loss = np.array([v is None or bool(np.isfinite(v)) for v in loss])
    scale_s = run.steps.get("loss_scale")
    scale = np.array([C.value_at(scale_s, int(k)) for k in steps], dtype=object)
    at_floor = np.array([v is not None and np.isfinite(v) and v <= floor for v in scale])
    runs = skip_runs(sk)
    persistent = sk & (runs >= max_run)
    benign = sk & finite_loss & ~persistent & ~at_floor
    scales = [float(v) for v in scale if v is not None and np.isfinite(v)]
    summary = {
        "skipped_steps": int(sk.sum()),
        "steps": int(steps.size),
        "benign_skipped_steps": int(benign.sum()),
        "first_skipped_step": int(steps[sk][0]),
        "last_skipped_step": int(steps[sk][-1]),
        "max_consecutive_skipped": int(runs.max()),
        "loss_scale_min": min(scales) if scales else None,
        "loss_scale_last": scales[-1] if scales else None,
        "skip_threshold": f"benign: loss finite, < {max_run} consecutive skips, "
        f"loss scale > {floor:g}",
    }
    if persistent.any():
        summary["first_persistent_skip_step"] = int(steps[persistent][0])
    if (sk & at_floor).any():
        summary["first_skip_at_floor_step"] = int(steps[sk & at_floor][0])
    return {int(k) for k in steps[benign]}, summary


def skips_finding(run: RunData, skips: dict) -> Finding:
    """The ``info`` finding for benign loss-scaling skips (no non-finite onset)."""
    return Finding(
        kind="nan_inf",
        severity="info",
        run=run.name,
        first_step=skips["first_skipped_step"],
        last_step=skips["last_skipped_step"],
        layers=[],
        evidence=dict(skips),
        explanation=(
            f"The LossScaleOptimizer skipped {skips['skipped_steps']} of {skips['steps']} steps "
            f"(at most {skips['max_consecutive_skipped']} in a row) because the scaled "
            "gradients overflowed while the loss stayed finite; it lowered the loss scale "
            f"to {C.fmt(skips['loss_scale_min'])}. This is normal dynamic loss scaling, "
            "not a NaN in training."
        ),
        remedy=(
            "Nothing to fix. Many skips at the start only mean the initial scale is high:\n"
            "    optimizer = keras.optimizers.LossScaleOptimizer(inner, initial_scale=2.0**10)"
        ),
    )
