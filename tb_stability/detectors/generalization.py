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

Never improved: with ``NEVER_MIN_POINTS`` (3) or more common points, a
validation loss that rose at every evaluation from the first to ``NEVER_RISE``
(1.2x) it while the training loss fell to <= ``NEVER_TRAIN_FALL`` (0.9x) its
first value (or the rule above with ``b`` at the first point), and ended
``NEVER_GAP`` (1.5) times above the final training loss, is told apart:
a model rarely memorises from its first epoch, and a validation set unlike the
training set does exactly this (Keras' ``validation_split`` takes the last
fraction of arrays sorted by class or time). The validation accuracy, where
logged, is compared with guessing among the classes the run recorded.
"""

from __future__ import annotations

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.detectors import _loss_tags
from tb_stability.detectors import _remedies as remedies
from tb_stability.detectors import _robust as R
from tb_stability.findings import Finding
from tb_stability.rundata import RunData, Series, held_out_names

MIN_POINTS = 5
RISE = 1.1
TRAIN_FALL = 0.98
NEVER_MIN_POINTS = 3
NEVER_RISE = 1.2
NEVER_GAP = 1.5
NEVER_TRAIN_FALL = 0.9
VAL_ACCURACY_TAGS = ("epoch_val_accuracy", "val_accuracy", "epoch_val_acc", "val_acc")


def overfit(train, val) -> dict | None:
    """Overfitting test on aligned finite train/val arrays (see module docstring)."""
    t = np.asarray(train, dtype=np.float64)
    v = np.asarray(val, dtype=np.float64)
    if t.size != v.size:
        return None
    if t.size < MIN_POINTS:
        return never_improved(t, v)
    sv = R.rolling_median(v, 3)
    b = int(np.nanargmin(sv))
    if v.size - 1 - b < 2 or not sv[b] > 0:
        return None
    if sv[-1] < RISE * sv[b] or not t[-1] <= TRAIN_FALL * t[b]:
        return never_improved(t, v)
    return {"best_index": b, "best_val": float(sv[b]), "final_val": float(sv[-1]),
            "train_at_best": float(t[b]), "final_train": float(t[-1]),
            "val_rise": float(sv[-1] / sv[b]),
            "never_improved": b == 0 and v[-1] >= NEVER_GAP * t[-1]}


def never_improved(train, val) -> dict | None:
    """A validation loss that rose at every evaluation while training fell (module docstring)."""
    t = np.asarray(train, dtype=np.float64)
    v = np.asarray(val, dtype=np.float64)
    if t.size < NEVER_MIN_POINTS or t.size != v.size or not v[0] > 0:
        return None
    if not np.all(np.diff(v) > 0) or v[-1] < NEVER_RISE * v[0] or v[-1] < NEVER_GAP * t[-1] \
            or not t[-1] <= NEVER_TRAIN_FALL * t[0]:
        return None
    return {"best_index": 0, "best_val": float(v[0]), "final_val": float(v[-1]),
            "train_at_best": float(t[0]), "final_train": float(t[-1]),
            "val_rise": float(v[-1] / v[0]), "never_improved": True}


def _align(a: Series, b: Series):
    common, ia, ib = np.intersect1d(a.steps, b.steps, return_indices=True)
    ok = np.isfinite(a.values[ia]) & np.isfinite(b.values[ib])
    return common[ok], a.values[ia][ok], b.values[ib][ok]


def _finding(run_name, steps, tr, va, o, sources, accuracy=None) -> Finding:
    b = o["best_index"]
    best_step = int(steps[b])
    evidence = {**sources, "best_val_loss": o["best_val"], "best_step": best_step,
                "final_val_loss": o["final_val"], "val_rise": o["val_rise"],
                "train_loss_at_best": o["train_at_best"], "final_train_loss": o["final_train"],
                "threshold": f"val loss >= {RISE:g}x its minimum while train loss <= "
                f"{TRAIN_FALL:g}x its value there"}
    if o["never_improved"]:
        evidence["never_improved"] = True
        evidence["threshold"] += (f"; never improved: the minimum is the first evaluation (or val "
                                  f"loss up at every one of >= {NEVER_MIN_POINTS} evaluations to "
                                  f">= {NEVER_RISE:g}x its first while train loss <= "
                                  f"{NEVER_TRAIN_FALL:g}x its first), ending >= {NEVER_GAP:g}x "
                                  "the final train loss")
        if accuracy:
            evidence.update(accuracy)
        return Finding(
            kind="overfitting", severity="warning", run=run_name,
            first_step=int(steps[min(1, steps.size - 1)]), last_step=int(steps[-1]),
            evidence=evidence,
            explanation=(
                f"Validation loss never improved: it rose from its first value, "
                f"{C.fmt(o['best_val'])} (step {best_step}), to {C.fmt(o['final_val'])} "
                f"({C.fmt(o['val_rise'])}x) while training loss fell from "
                f"{C.fmt(o['train_at_best'])} to {C.fmt(o['final_train'])}."
                + _accuracy_sentence(accuracy)
                + " A model rarely memorises from its first epoch; more often the validation "
                "data are unlike the training data."
            ),
            remedy=(
                "Check the split before regularising. Keras' validation_split takes the last "
                "fraction of x and y as given, before any shuffling, so arrays sorted by class "
                "or time give a validation set the model never trains on; shuffle first, and "
                "preprocess validation inputs exactly as training inputs:\n"
                + remedies.SHUFFLE_BEFORE_SPLIT
                + "If the split is sound, the model memorises a small training set at once: "
                "regularise and stop early:\n"
                "    keras.callbacks.EarlyStopping(monitor='val_loss', patience=3, "
                "restore_best_weights=True)"
            ),
        )
    return Finding(
        kind="overfitting",
        severity="warning",
        run=run_name,
        first_step=int(steps[min(b + 1, steps.size - 1)]),
        last_step=int(steps[-1]),
        evidence=evidence,
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


def _accuracy_sentence(accuracy: dict | None) -> str:
    if not accuracy:
        return ""
    return (f" Validation accuracy ended at {accuracy['final_val_accuracy']:.1%}, below the "
            f"{accuracy['chance_accuracy']:.0%} of guessing among {accuracy['classes']} classes.")


def _below_chance(val_run: RunData, tags, classes_run: RunData) -> dict | None:
    """Final validation accuracy and chance level, where the accuracy is below guessing."""
    classes = _classes(classes_run)
    if classes < 2:
        return None
    for tag in tags:
        s = val_run.scalars.get(tag)
        if s is None or not len(s) or not np.isfinite(s.values[-1]):
            continue
        final = float(s.values[-1])
        if final < 1.0 / classes:
            return {"val_accuracy_tag": tag, "final_val_accuracy": final,
                    "chance_accuracy": 1.0 / classes, "classes": classes}
        return None
    return None


def _classes(run: RunData) -> int:
    """Number of classes: the recorded label counts' width, else the output's units."""
    if run.labels is not None and len(run.labels):
        return int(run.labels.values.shape[1])
    units = C.first_run_info(run).get("output_units")
    return int(units) + (1 if units == 1 else 0) if isinstance(units, int) else 0


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
        if steps.size < NEVER_MIN_POINTS:
            continue
        o = overfit(tr, va)
        if o is None:
            return []
        accuracy = _below_chance(run, VAL_ACCURACY_TAGS, run) if o["never_improved"] else None
        return [_finding(run.name, steps, tr, va, o, {"train_tag": ttag, "val_tag": vtag},
                         accuracy)]
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
            accuracy = (_below_chance(vrun, ("epoch_accuracy", "accuracy"), run)
                        if o["never_improved"] else None)
            out.append(_finding(other, steps, tr, va, o, {"train_run": name, "validation_run": other,
                                                          "tag": tag}, accuracy))
    return out
