"""class_imbalance: classes the output predicts that never appear in the training labels.

Signal: ``run.labels`` class counts (one column per class the output can
predict), summed over records. Rule: at least two classes appear, each with
at least ``MIN_PER_CLASS`` (20) of the recorded labels, and one or more never
do: a missing class would have to be over 20 times rarer than the rarest one
present (so a long tail, whose rare classes show up a few times, is not
flagged). Severity: ``warning``: the model is never trained on the missing
classes and learns never to predict them. The usual cause in Keras is
``validation_split``, which takes the last fraction of arrays sorted by
class; the remedy says so when the run logs a validation loss.
"""

from __future__ import annotations

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.detectors import _remedies as remedies
from tb_stability.findings import Finding
from tb_stability.rundata import RunData

MIN_PER_CLASS = 20
MAX_NAMED = 5


def missing(counts) -> list[int] | None:
    """Indices of the classes with no label, where the rule holds (module docstring)."""
    c = np.nan_to_num(np.asarray(counts, dtype=np.float64))
    present = c[c > 0]
    if present.size < 2 or present.size == c.size or present.min() < MIN_PER_CLASS:
        return None
    return [int(j) for j in np.flatnonzero(c == 0)]


def detect(run: RunData) -> list[Finding]:
    """class_imbalance adapter for classes that never appear."""
    lab = run.labels
    if lab is None or not len(lab) or C.multilabel(run):
        return []
    counts = np.nansum(lab.values, axis=0)
    absent = missing(counts)
    if absent is None:
        return []
    names = [str(lab.names[j]) for j in absent]
    listed = ", ".join(names[:MAX_NAMED]) + (f" and {len(names) - MAX_NAMED} more"
                                             if len(names) > MAX_NAMED else "")
    one = len(names) == 1
    it = "it" if one else "them"
    total = int(counts.sum())
    val, _ = C.val_loss_series(run)
    split = (
        "Keras' validation_split takes the last fraction of x and y as given, before any "
        "shuffling, so arrays sorted by label leave whole classes out of training; shuffle "
        "before fit:\n" + remedies.SHUFFLE_BEFORE_SPLIT
    ) if val is not None else ""
    return [Finding(
        kind="class_imbalance", severity="warning", run=run.name,
        first_step=int(lab.steps[0]), last_step=int(lab.steps[-1]),
        evidence={"missing_classes": names, "label_counts": {str(lab.names[j]): float(counts[j])
                                                             for j in range(len(counts))},
                  "labels_recorded": total, "output_classes": len(counts),
                  "threshold": f"a class with no label while two or more classes appear, each "
                  f">= {MIN_PER_CLASS} times"},
        explanation=(
            f"{'Class' if one else 'Classes'} {listed} never {'appears' if one else 'appear'} "
            f"among the {total} training labels recorded, though the output predicts "
            f"{len(counts)} classes: the model is never trained on {it} and learns never to "
            f"predict {it}."
        ),
        remedy=split + (
            "Check that the training set holds every class, or give the output one unit per "
            "class that occurs:\n"
            f"    print(np.bincount(y_train.ravel().astype(int), minlength={len(counts)}))"
        ),
    )]
