"""stalled at the base rate: a classifier that learned the class shares and nothing else.

With x and y shuffled apart (or a wrong label column, or features with no
signal), a cross-entropy loss falls from its initial value to the entropy of
the labels, the loss of predicting the class shares for every input, and
stays there while the weights keep moving: the loss "improved", the update
ratios are healthy, and no other rule fires.

Rule: a single cross-entropy loss with recorded class counts
(`_common.label_entropy` ``H``), at least ``MIN_POINTS`` (64) finite training
losses, and the final training level (median of the last 10 %) within
[``LOW`` (0.9), ``HIGH`` (1.1)] x ``H`` (a class-weighted loss sits elsewhere),
and a validation loss whose final value is within [``HELD_OUT`` (0.97),
``HELD_OUT_HIGH`` (1.5)] x ``H`` (nothing the model learned holds on unseen
data; a validation loss far above ``H`` is overfitting's, or validation data
unlike the training data: a class-sorted split ended at 3.8x). Without a
validation loss the rule says nothing: a model that learns slowly (a 10-unit
MLP after one epoch, 0.98x ``H``) looks the same on the training loss alone.
Not where the predictions collapsed to one class (class_imbalance says the
same there) or where `trends` already reports the run as stalled. Where the kernels
collapsed to zero (`_weight_collapse`: a weight decay or L2 penalty far too
strong) that is named as the cause, with its remedy. Severity: ``warning``.
"""

from __future__ import annotations

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.detectors import _robust as R
from tb_stability.detectors import _weight_collapse as collapse
from tb_stability.detectors import data, trends
from tb_stability.findings import Finding
from tb_stability.rundata import RunData

MIN_POINTS = 64
LOW = 0.9
HIGH = 1.1
HELD_OUT = 0.97
HELD_OUT_HIGH = 1.5

REMEDY = (
    "Check that each label belongs to its input: x and y shuffled, sorted or filtered separately, "
    "a wrong label column, or a pipeline that pairs them out of order. Then check that a small "
    "model can fit a few hundred samples (if it cannot, the features do not carry the labels):\n"
    "    print(x[:5], y[:5])  # do these labels fit these inputs?\n"
    "    model.fit(x[:256], y[:256], epochs=200)  # the training loss must approach 0"
)


def detect(run: RunData) -> list[Finding]:
    """stalled-at-the-base-rate adapter (see module docstring)."""
    entropy = C.label_entropy(run)
    loss, source = C.loss_series(run)
    if entropy is None or loss is None:
        return []
    values = loss.values[np.isfinite(loss.values)]
    if values.size < MIN_POINTS:
        return []
    final = R.level(values, at_end=True)
    if not LOW * entropy <= final <= HIGH * entropy:
        return []
    val, val_tag = C.val_loss_series(run)
    val_values = val.values[np.isfinite(val.values)] if val is not None else np.zeros(0)
    if not val_values.size or not HELD_OUT * entropy <= val_values[-1] <= HELD_OUT_HIGH * entropy:
        return []
    if _collapsed(run) or trends.detect_stalled(run):
        return []
    final_val = float(val_values[-1])
    explanation = (
        f"The training loss settled at {C.fmt(final)}, {final / entropy:.2f}x the entropy of "
        f"the labels ({C.fmt(entropy)}): the loss of predicting the class shares for every "
        f"input. The model learned how often each class occurs and nothing about the inputs: "
        f"the validation loss ends at {C.fmt(final_val)}, no better than the class shares.")
    remedy, extra = REMEDY, {}
    pulled = collapse.cause(run)
    if pulled is not None:  # the weights were pulled to zero: the labels are not to blame
        because, remedy, extra = pulled
        explanation += because
    return [Finding(
        kind="stalled",
        severity="warning",
        run=run.name,
        first_step=int(loss.steps[len(loss) // 2]),
        last_step=int(loss.steps[-1]),
        evidence={"source": source, "final_loss": final, "label_entropy": entropy,
                  "ratio_to_entropy": final / entropy, "validation_source": val_tag,
                  "final_val_loss": final_val, **extra,
                  "threshold": f"final training loss in [{LOW:g}, {HIGH:g}] x the labels' entropy "
                  f"and final validation loss in [{HELD_OUT:g}, {HELD_OUT_HIGH:g}] x it"},
        explanation=explanation,
        remedy=remedy,
    )]


def _collapsed(run: RunData) -> bool:
    """Whether class_imbalance reports the predictions collapsed to one class (it says the same)."""
    return any("prediction_share" in f.evidence for f in data.detect_imbalance(run))
