"""A learning rate that decayed to almost nothing while the run went on.

A schedule whose ``decay_steps`` was meant in epochs (``ExponentialDecay(1e-3,
decay_steps=5, decay_rate=0.5)`` halves the rate every 5 *batches*), or a
callback that keeps lowering the rate without a floor, leaves the weights
frozen for the rest of the run. update_ratio_low sees the tiny updates; this
says why, and fixes the schedule instead of raising a rate that is only the
end of a decay.

Rule: the logged learning rate (`_common.lr_series`) ends at or below
``DECAYED`` (1e-3) times its peak, and ``stopped_step``, the first step after
the peak where it is below ``STOPPED`` (1 %) of the peak, lies in the first
half of the run (a cosine decay to 0 gets there only in its last ~6 %, and
cannot explain updates that were tiny all along).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.detectors import _remedies as remedies
from tb_stability.rundata import RunData

DECAYED = 1e-3
STOPPED = 1e-2
DECAY_STEP_FIELDS = ("decay_steps", "first_decay_steps")  # CosineDecayRestarts names it so


class Decay(NamedTuple):
    """How the learning rate fell (see module docstring)."""

    peak: float
    peak_step: int
    final: float
    final_step: int
    stopped_step: int
    schedule: tuple[str, dict] | None  # (class name, config) of the optimizer's schedule


def decayed(run: RunData) -> Decay | None:
    """The run's learning-rate decay to (almost) nothing, or None."""
    s = C.lr_series(run)
    if s is None:
        return None
    ok = np.isfinite(s.values) & (s.values >= 0)
    if ok.sum() < 2:
        return None
    steps, values = s.steps[ok], np.asarray(s.values[ok], dtype=np.float64)
    top = int(np.argmax(values))
    peak, final = float(values[top]), float(values[-1])
    if not (peak > 0 and final <= DECAYED * peak):
        return None
    low = np.flatnonzero(values[top:] < STOPPED * peak)
    stopped = int(steps[top + int(low[0])])
    if stopped - steps[0] > (steps[-1] - steps[0]) / 2:
        return None  # a decay to ~0 at the end (CosineDecay's alpha=0) does not explain a whole run
    return Decay(peak, int(steps[top]), final, int(steps[-1]), stopped, _schedule(run))


def _schedule(run: RunData) -> tuple[str, dict] | None:
    _, config = remedies.recorded_optimizer(run)
    lr = config.get("learning_rate")
    if isinstance(lr, dict) and isinstance(lr.get("class_name"), str) and isinstance(lr.get("config"), dict):
        return lr["class_name"], lr["config"]
    return None


def explanation(run: RunData, d: Decay) -> str:
    """Why the updates are tiny: the decay, in a sentence or two."""
    text = (f"The learning rate itself fell from {C.fmt(d.peak)} (step {d.peak_step}) to "
            f"{C.fmt(d.final)} (step {d.final_step}), {C.fmt(d.peak / d.final) if d.final else 'infinitely'}"
            f"{'x' if d.final else ''} lower, and was below 1% of its peak from step {d.stopped_step} on: "
            "the weights stopped moving because the rate decayed, not because it was set too low.")
    if d.schedule is not None:
        name, config = d.schedule
        field = _decay_field(config)
        if field is not None:
            text += (f" The optimizer's {name} has {field}={config[field]}, and the run lasted "
                     f"{d.final_step + 1} steps: {field} counts optimizer steps (batches), not epochs.")
    return text


def remedy(run: RunData, d: Decay) -> str:
    """A schedule that spans the run (or a floor for the callback that lowered the rate)."""
    steps = d.final_step + 1
    if d.schedule is not None:
        name, config = d.schedule
        field = _decay_field(config)
        if field is not None:
            start = config.get("initial_learning_rate")
            rest = [k for k in config
                    if k not in ("name", field, "initial_learning_rate") and config[k] is not None]
            args = ([f"initial_learning_rate={_literal(start)}"] if start is not None else [])
            args += [f"{field}={steps}"] + [f"{k}={_literal(config[k])}" for k in rest]
            per_epoch = _steps_per_epoch(run)
            note = f"  # this run's length; {per_epoch} steps per epoch" if per_epoch else "  # this run's length"
            return ("Make the schedule span the run (decay_steps in optimizer steps, i.e. epochs x "
                    "steps per epoch):\n"
                    f"    lr = keras.optimizers.schedules.{name}({', '.join(args)}){note}\n"
                    f"    optimizer = {remedies.optimizer_call(run, 'learning_rate=lr')}")
        return (f"The optimizer's {name} schedule decays the rate to ~0 within the run: give it an end "
                f"value >= 1% of its start, or a schedule over the run's {steps} steps:\n"
                f"    lr = keras.optimizers.schedules.CosineDecay({C.round_sig(d.peak):g}, "
                f"decay_steps={steps}, alpha=0.01)\n"
                f"    optimizer = {remedies.optimizer_call(run, 'learning_rate=lr')}")
    floor = f"{C.round_sig(d.peak * DECAYED):g}"
    return ("Something lowered the rate during training (a LearningRateScheduler or "
            "ReduceLROnPlateau callback): give it a floor, 1000x below the start at most:\n"
            f"    keras.callbacks.ReduceLROnPlateau(monitor='loss', factor=0.5, patience=3, min_lr={floor})\n"
            f"    keras.callbacks.LearningRateScheduler(lambda epoch, lr: max(schedule(epoch, lr), {floor}))")


def _decay_field(config: dict) -> str | None:
    """The schedule's field that counts its decay in steps, if it has one."""
    return next((f for f in DECAY_STEP_FIELDS if f in config), None)


def _literal(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value)


def _steps_per_epoch(run: RunData) -> int | None:
    value = C.first_run_info(run).get("steps_per_epoch")
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None
