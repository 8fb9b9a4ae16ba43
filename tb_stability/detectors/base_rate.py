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

Regression (`detect_regression`): a mean squared error settles at the
labels' variance ``V`` when the model predicts their mean for every input.
``V`` is pooled from the recorded regression labels (``stability/targets``,
at least ``MIN_TARGET_RECORDS`` (3) probe batches: the mean of the batches'
variances plus the variance of their means, averaged over target columns,
as Keras' MSE averages them). Rule: an MSE loss, at least ``MIN_POINTS``
finite training losses whose final level is within [``VAR_LOW`` (0.85),
``VAR_HIGH`` (1.3)] x ``V`` (or x the labels' mean square ``V + mean²``,
the error of predicting 0, where that is at least 2x ``V``: an output held
at zero, reported only where `_weight_collapse.cause` finds a weight decay
that takes the bias too; a deep saturated model held there has its own
vanishing-gradient finding), and either a validation loss ending at or above
``VAL_VAR`` (0.85) x it or, without one, a second half of training that
improved the loss by less than ``FLAT`` (5 %). Not where `trends` reports
the run as stalled. The collapse or a weight decay that holds the kernels
near zero is named as in the classification rule.
"""

from __future__ import annotations

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.detectors import _label_shapes as shapes
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
MSE_LOSSES = ("mse", "mean_squared_error")
MIN_TARGET_RECORDS = 3
VAR_LOW = 0.85
VAR_HIGH = 1.3
VAL_VAR = 0.85
FLAT = 0.05

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
    if entropy is None:
        return detect_regression(run)
    settled = _settled_loss(run)
    if settled is None:
        return []
    loss, source, _, final = settled
    if not LOW * entropy <= final <= HIGH * entropy:
        return []
    final_val, val_tag = _final_validation(run)
    if final_val is None or not HELD_OUT * entropy <= final_val <= HELD_OUT_HIGH * entropy:
        return []
    if _collapsed(run) or trends.detect_stalled(run):
        return []
    explanation = (
        f"The training loss settled at {C.fmt(final)}, {final / entropy:.2f}x the entropy of "
        f"the labels ({C.fmt(entropy)}): the loss of predicting the class shares for every "
        f"input. The model learned how often each class occurs and nothing about the inputs: "
        f"the validation loss ends at {C.fmt(final_val)}, no better than the class shares.")
    return [_finding(run, loss, collapse.cause(run), explanation, REMEDY, {
        "source": source, "final_loss": final, "label_entropy": entropy,
        "ratio_to_entropy": final / entropy, "validation_source": val_tag,
        "final_val_loss": final_val,
        "threshold": f"final training loss in [{LOW:g}, {HIGH:g}] x the labels' entropy "
                     f"and final validation loss in [{HELD_OUT:g}, {HELD_OUT_HIGH:g}] x it"})]


def target_moments(run: RunData) -> tuple[float, float] | None:
    """``(variance, mean square)`` of the recorded regression labels, pooled over probe batches
    and averaged over target columns: the MSE of predicting their mean, and of predicting 0.

    None with fewer than `MIN_TARGET_RECORDS` finite records, or a variance of 0.
    """
    mean, std = run.targets.get("mean"), run.targets.get("std")
    if mean is None or std is None or len(mean) < MIN_TARGET_RECORDS \
            or mean.values.shape != std.values.shape:
        return None
    finite = np.isfinite(mean.values).all(axis=1) & np.isfinite(std.values).all(axis=1)
    if np.count_nonzero(finite) < MIN_TARGET_RECORDS:
        return None
    means, stds = mean.values[finite], std.values[finite]
    within = np.mean(stds ** 2, axis=0)
    variance = float(np.mean(within + np.var(means, axis=0)))
    square = float(np.mean(within + np.mean(means ** 2, axis=0)))
    return (variance, square) if variance > 0 else None


def detect_regression(run: RunData) -> list[Finding]:
    """An MSE loss settled at the variance of the labels (see module docstring)."""
    if C.latest_run_info(run, "loss_name").get("loss_name") not in MSE_LOSSES:
        return []
    moments = target_moments(run)
    settled = _settled_loss(run) if moments is not None else None
    if settled is None:
        return []
    loss, source, values, final = settled
    variance, square = moments
    if VAR_LOW * variance <= final <= VAR_HIGH * variance:
        base, held_at_zero = variance, False
    elif square >= 2 * variance and VAR_LOW * square <= final <= VAR_HIGH * square:
        base, held_at_zero = square, True  # zero is far from the mean: the output stays at 0
    else:
        return []
    pulled = collapse.cause(run)
    if held_at_zero and pulled is None:
        return []  # no decay holds it there: saturated or dead layers (their own findings)
    final_val, val_tag = _final_validation(run)
    if final_val is not None:
        if final_val < VAL_VAR * base:
            return []
        held = f"the validation loss ends at {C.fmt(final_val)}, no better."
    else:
        if final < (1 - FLAT) * R.level(values[values.size // 2:]):
            return []  # still improving
        held = "the loss has stayed there over the second half of training."
    if trends.detect_stalled(run):
        return []
    if held_at_zero:
        explanation = (
            f"The training loss (mean squared error) settled at {C.fmt(final)}, "
            f"{final / base:.2f}x the mean square of the labels ({C.fmt(base)}; their variance is "
            f"{C.fmt(variance)}): the error of predicting 0 for every input. The model's output "
            f"is held at zero: {held}")
    else:
        explanation = (
            f"The training loss (mean squared error) settled at {C.fmt(final)}, "
            f"{final / base:.2f}x the variance of the labels ({C.fmt(base)}): the error of "
            f"predicting their mean for every input. The model learned nothing about the inputs: "
            f"{held}")
    evidence = {
        "source": source, "final_loss": final, "label_variance": variance,
        "label_mean_square": square, "predicts": "zero" if held_at_zero else "mean",
        "ratio_to_base": final / base, "validation_source": val_tag,
        "final_val_loss": final_val,
        "threshold": f"final MSE in [{VAR_LOW:g}, {VAR_HIGH:g}] x the labels' variance "
                     "(or x their mean square, when it is >= 2x the variance) and a final "
                     f"validation MSE >= {VAL_VAR:g} x it (without one: the second half "
                     f"improved < {FLAT:.0%})"}
    remedy = REMEDY
    pair = shapes.broadcast_pair(run) if not held_at_zero else None
    if pair is not None:  # the labels are paired with every prediction, not shuffled
        explanation += shapes.explanation(pair)
        remedy = shapes.remedy(pair)
        evidence.update(label_shape=list(pair[0]), prediction_shape=list(pair[1]),
                        broadcast_shape=list(pair[2]))
    return [_finding(run, loss, pulled, explanation, remedy, evidence)]


def _settled_loss(run: RunData):
    """``(loss series, its source, finite values, final level)`` of the training loss (median of
    its last 10 %); None without one or with fewer than `MIN_POINTS` finite values."""
    loss, source = C.loss_series(run)
    if loss is None:
        return None
    values = loss.values[np.isfinite(loss.values)]
    if values.size < MIN_POINTS:
        return None
    return loss, source, values, R.level(values, at_end=True)


def _final_validation(run: RunData) -> tuple[float | None, str]:
    """``(last finite validation loss, its tag)``; None where the run logs none."""
    val, val_tag = C.val_loss_series(run)
    finite = val.values[np.isfinite(val.values)] if val is not None else np.zeros(0)
    return (float(finite[-1]) if finite.size else None), val_tag


def _finding(run: RunData, loss, pulled, explanation: str, remedy: str,
             evidence: dict) -> Finding:
    """The ``stalled`` warning over the second half of ``loss``, with ``remedy`` unless the
    weights were pulled to zero (``pulled``, from `_weight_collapse.cause`: then the labels
    are not to blame)."""
    explanation, remedy, evidence = collapse.blame(pulled, explanation, remedy, evidence)
    return Finding(kind="stalled", severity="warning", run=run.name,
                   first_step=int(loss.steps[len(loss) // 2]), last_step=int(loss.steps[-1]),
                   evidence=evidence, explanation=explanation, remedy=remedy)


def _collapsed(run: RunData) -> bool:
    """Whether class_imbalance reports the predictions collapsed to one class (it says the same)."""
    return any("prediction_share" in f.evidence for f in data.detect_imbalance(run))
