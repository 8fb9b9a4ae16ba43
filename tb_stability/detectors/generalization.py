"""overfitting: validation loss rising while training loss falls.

Signals: a training loss and a validation loss on a common step axis (steps
present in both), either within one run (``epoch_loss`` + ``epoch_val_loss``,
``loss`` + ``val_loss``, ``Loss/train`` + ``Loss/test``, ...) or across a
training run and its held-out sibling (Keras' ``X/train`` and
``X/validation``, tag ``epoch_loss`` in both; see `detect_pairs`).

Rule: needs >= ``MIN_POINTS`` (5) common points. Smooth the validation loss
with a trailing median of 3; ``b`` is its minimum. Overfitting when at least
2 points follow ``b``, the final smoothed validation loss is >= ``RISE``
(1.1x) its minimum, and the training loss fell over the same span (final <=
0.98x its value at ``b``). Onset: the step after ``b``. Severity: ``warning``.
"""

from __future__ import annotations

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.detectors import _loss_tags
from tb_stability.detectors import _robust as R
from tb_stability.findings import Finding
from tb_stability.rundata import RunData, Series, held_out_names

MIN_POINTS = 5
RISE = 1.1
TRAIN_FALL = 0.98


def overfit(train, val) -> dict | None:
    """Overfitting test on aligned finite train/val arrays (see module docstring)."""
    t = np.asarray(train, dtype=np.float64)
    v = np.asarray(val, dtype=np.float64)
    if t.size < MIN_POINTS or t.size != v.size:
        return None
    sv = R.rolling_median(v, 3)
    b = int(np.nanargmin(sv))
    if v.size - 1 - b < 2 or not sv[b] > 0:
        return None
    if sv[-1] < RISE * sv[b] or not t[-1] <= TRAIN_FALL * t[b]:
        return None
    return {"best_index": b, "best_val": float(sv[b]), "final_val": float(sv[-1]),
            "train_at_best": float(t[b]), "final_train": float(t[-1]),
            "val_rise": float(sv[-1] / sv[b])}


def _align(a: Series, b: Series):
    common, ia, ib = np.intersect1d(a.steps, b.steps, return_indices=True)
    ok = np.isfinite(a.values[ia]) & np.isfinite(b.values[ib])
    return common[ok], a.values[ia][ok], b.values[ib][ok]


def _finding(run_name, steps, tr, va, o, sources) -> Finding:
    b = o["best_index"]
    best_step = int(steps[b])
    return Finding(
        kind="overfitting",
        severity="warning",
        run=run_name,
        first_step=int(steps[min(b + 1, steps.size - 1)]),
        last_step=int(steps[-1]),
        evidence={**sources, "best_val_loss": o["best_val"], "best_step": best_step,
                  "final_val_loss": o["final_val"], "val_rise": o["val_rise"],
                  "train_loss_at_best": o["train_at_best"], "final_train_loss": o["final_train"],
                  "threshold": f"val loss >= {RISE:g}x its minimum while train loss <= "
                  f"{TRAIN_FALL:g}x its value there"},
        explanation=(
            f"Validation loss bottomed at {C.fmt(o['best_val'])} (step {best_step}) and rose "
            f"{C.fmt(o['val_rise'])}x while training loss kept falling to {C.fmt(o['final_train'])}: "
            "the model is memorising the training set."
        ),
        remedy=(
            f"Stop at the best point (step {best_step}) and regularise:\n"
            "    keras.callbacks.EarlyStopping(monitor='val_loss', patience=3, restore_best_weights=True)\n"
            "    keras.layers.Dropout(0.3)\n"
            "    keras.layers.Dense(64, kernel_regularizer=keras.regularizers.L2(1e-4))\n"
            "Also consider more data or augmentation."
        ),
    )


def _train_tags(run: RunData) -> list[str]:
    """Scalar training loss tags to pair with a validation loss, best first."""
    exact = [t for t in ("epoch_loss", "loss", "train_loss") if len(run.scalars.get(t, ()))]
    return exact + [t for t in _loss_tags.training_loss_tags(run) if t not in exact]


def detect(run: RunData) -> list[Finding]:
    """overfitting within one run (train and validation loss tags side by side).

    The first training loss tag (`_train_tags`) that shares at least
    ``MIN_POINTS`` steps with a validation loss (its twin first) is the pair.
    """
    for ttag in _train_tags(run):
        val, vtag = C.val_loss_series(run, twin_of=ttag)
        if val is None:
            return []
        steps, tr, va = _align(run.scalars[ttag], val)
        if steps.size < MIN_POINTS:
            continue
        o = overfit(tr, va)
        if o is None:
            return []
        return [_finding(run.name, steps, tr, va, o, {"train_tag": ttag, "val_tag": vtag})]
    return []


def _shared_tag(train: RunData, val: RunData) -> str | None:
    """The loss tag both runs log: ``epoch_loss`` (Keras), else the training run's best."""
    for tag in _train_tags(train):
        if len(val.scalars.get(tag, ())):
            return tag
    return None


def detect_pairs(runs: dict[str, RunData]) -> list[Finding]:
    """overfitting across a training run and its held-out sibling.

    Keras' ``X/train`` and ``X/validation``, or ``X/train`` beside ``X/val``,
    ``X/test``, ... (`rundata.held_out_names`), logging the same loss tag.
    The finding is attributed to the held-out run.
    """
    out = []
    for other, name in held_out_names(runs).items():
        if not name:
            continue
        run, vrun = runs[name], runs[other]
        tag = _shared_tag(run, vrun)
        if tag is None:
            continue
        steps, tr, va = _align(run.scalars[tag], vrun.scalars[tag])
        o = overfit(tr, va)
        if o is not None:
            out.append(_finding(other, steps, tr, va, o, {"train_run": name, "validation_run": other,
                                                          "tag": tag}))
    return out
