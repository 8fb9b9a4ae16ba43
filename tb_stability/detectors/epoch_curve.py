"""The training loss logged once per epoch: a steady rise, and a level frozen in place.

An epoch's mean loss averages a whole epoch of batches, so its noise is small:
shapes that a per-step loss hides under its batch noise show. Both tests read
the per-epoch training loss (`_common.epoch_loss_series`: Keras' ``epoch_loss``,
else a training loss tag with the word ``epoch``, like ``train_loss_epoch``),
finite values only, at least ``MIN_POINTS`` (8) of them.

Steady rise (reported as ``divergence`` by `trends.detect_divergence` where its
own tests do not fire): the last ``RISES`` (6) differences all > 0 (seven
epochs each above the one before: for noise about a level, a 1 in 5040
chance) and the last value at least ``MIN_RISE`` (0.5 %) above the lowest.
`trends.divergence` waits for the loss to double, which a per-step loss needs
to tell a trend from its noise; a model whose loss goes up at every epoch is
being made worse by its own updates all the same: the steps overshoot. It is
also what a loss that blew up in its first steps looks like at Keras' default
``update_freq="epoch"``: the first epoch's mean holds the blow-up, and the
collapsed model then creeps upward (Adam at 1.0 on a small classifier: 222,
then 2.01, 1.656, and up at every epoch to 1.669). When the first epoch's mean
is ``FIRST_EPOCH`` (10) times the median of the others, the explanation says
that it may hold such a blow-up and the remedy starts from a fresh
initialisation (unscaled regression targets give such a first epoch too, so
this is a pointer to per-batch logging, not a finding of its own). Severity
``warning``.

Frozen level (one of `trends.detect_stalled`'s signs that the weights do not
move, where no update ratios are logged): over the second half of the epochs
(at least ``FROZEN_EPOCHS``, 4) the loss stays within ``FLAT`` (1e-5) of its
median, relative, and that median is above ``1e-3`` times the first half's
(not a loss driven to ~0). The same data through the same weights gives the
same epoch mean, up to float32 rounding (~1e-7); weights that move change it:
across a sweep of small Keras fits (Adam, SGD and RMSprop at 1e-4 to 1.0, with
and without dropout) the second halves of the moving ones spanned at least
4.9e-4 of their level, the three whose units all died at most 1.4e-7. A
learning rate that decayed ``DECAYED`` (100) times or more over the run leaves
the weights still by design, and is not a stall.
"""

from __future__ import annotations

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.detectors import _remedies as remedies
from tb_stability.findings import Finding
from tb_stability.rundata import RunData

MIN_POINTS = 8
RISES = 6
MIN_RISE = 0.005
FIRST_EPOCH = 10.0
FROZEN_EPOCHS = 4
FLAT = 1e-5
NOT_ZERO = 1e-3
DECAYED = 100.0


def steady_rise(values) -> dict | None:
    """The steady-rise test on finite per-epoch loss values (see module docstring).

    Returns:
      None, or a dict with ``start_index`` (the last point before the rises),
      ``rises`` (how many consecutive rises end the series), ``best`` (the
      lowest value), ``best_index``, ``final``, ``relative_rise`` (of
      ``final`` over ``best``) and ``first_to_later`` (the first value over
      the median of the others).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size < MIN_POINTS:
        return None
    up = np.diff(x) > 0
    if not up[-RISES:].all():
        return None
    rises = RISES
    while rises < up.size and up[-rises - 1]:
        rises += 1
    best_index = int(np.argmin(x))
    best, final = float(x[best_index]), float(x[-1])
    if not best > 0 or final < (1.0 + MIN_RISE) * best:
        return None
    return {
        "start_index": x.size - 1 - rises,
        "rises": rises,
        "best": best,
        "best_index": best_index,
        "final": final,
        "relative_rise": final / best - 1.0,
        "first_to_later": float(x[0] / np.median(x[1:])),
    }


def frozen_level(values) -> dict | None:
    """The frozen-level test on finite per-epoch loss values (see module docstring).

    Returns:
      None, or a dict with ``since_index`` (the first index of the second
      half), ``level`` (its median) and ``relative_range`` ((max - min) /
      |level| over it).
    """
    x = np.asarray(values, dtype=np.float64)
    half = x[x.size // 2:]
    if x.size < MIN_POINTS or half.size < FROZEN_EPOCHS:
        return None
    level = float(np.median(half))
    if not abs(level) > NOT_ZERO * abs(float(np.median(x[: x.size // 2]))):
        return None
    spread = float((half.max() - half.min()) / abs(level))
    if spread > FLAT:
        return None
    return {"since_index": x.size // 2, "level": level, "relative_range": spread}


def frozen(run: RunData) -> dict | None:
    """`frozen_level` of the run's per-epoch loss, with ``since_step``; None where the
    learning rate decayed `DECAYED` x or more (a schedule that ended, not a stall)."""
    found = _tested(run, frozen_level)
    if found is None:
        return None
    _, steps, _, f = found
    first, last = C.lr_at(run, int(steps[0])), C.lr_at(run, int(steps[-1]))
    if first and last is not None and last * DECAYED <= first:
        return None
    return {**f, "since_step": int(steps[f["since_index"]])}


def _tested(run: RunData, test):
    """``(source, steps, values, result)`` of ``test`` on the run's per-epoch training loss
    (finite values only); None where it has none or the test does not fire."""
    found = C.epoch_loss_series(run)
    if found is None:
        return None
    series, source = found
    ok = np.isfinite(series.values)
    steps, values = series.steps[ok], series.values[ok]
    result = test(values)
    return None if result is None else (source, steps, values, result)


def rises(run: RunData) -> bool:
    """Whether the run's per-epoch training loss rises steadily (`steady_rise`)."""
    return _tested(run, steady_rise) is not None


def rise_finding(run: RunData) -> Finding | None:
    """The ``divergence`` finding of a steadily rising per-epoch loss, or None."""
    found = _tested(run, steady_rise)
    if found is None:
        return None
    source, steps, values, r = found
    start = int(steps[r["start_index"]])
    last = int(steps[-1])
    lr = C.lr_at(run, start)
    blew_up = r["first_to_later"] >= FIRST_EPOCH
    digits = max(3, int(np.ceil(-np.log10(r["relative_rise"]))) + 2)  # show the rise
    explanation = (
        f"The training loss rose at each of the last {r['rises']} epochs, from "
        f"{values[r['start_index']]:.{digits}g} (step {start}) to {r['final']:.{digits}g} "
        f"(step {last}), "
        f"{r['relative_rise']:.2%} above its best: each epoch's updates made the model worse, "
        "so the steps overshoot"
        + (f" (at a learning rate of {lr:g})" if lr else "") + "."
    )
    if blew_up:
        explanation += (
            f" The first epoch's mean, {C.fmt(values[0])}, was {C.fmt(r['first_to_later'])}x the "
            "later epochs': the loss may have blown up in its first steps, which per-epoch "
            "means hide, leaving the model collapsed (e.g. to a constant prediction)."
        )
    remedy = (
        ("Retrain from a fresh initialisation with the learning rate ~10x lower"
         if blew_up else "Lower the learning rate ~10x (or decay it)")
        + ", and log the loss per batch to see where it goes wrong "
        "(keras.callbacks.TensorBoard(update_freq='batch'), or the StabilityCallback):\n"
        f"    optimizer = {remedies.lowered_optimizer_call(run, 10.0)}\n"
        "    keras.callbacks.ReduceLROnPlateau(monitor='loss', factor=0.5, patience=2)"
    )
    return Finding(
        kind="divergence",
        severity="warning",
        run=run.name,
        first_step=start,
        last_step=last,
        evidence={
            "source": source,
            "steady_rise_epochs": r["rises"],
            "start_loss": float(values[r["start_index"]]),
            "best_loss": r["best"],
            "best_step": int(steps[r["best_index"]]),
            "final_loss": r["final"],
            "relative_rise": r["relative_rise"],
            "first_epoch_to_later": r["first_to_later"],
            "learning_rate": C.num(lr),
            "threshold": f"per-epoch loss up at each of the last {RISES} epochs and >= "
            f"{MIN_RISE:.1%} above its lowest; first epoch >= {FIRST_EPOCH:g}x the later ones "
            "noted as a possible hidden blow-up",
        },
        explanation=explanation,
        remedy=remedy,
    )
