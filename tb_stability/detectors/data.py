"""unscaled_inputs and class_imbalance, from the data statistics.

unscaled_inputs
  Signal: ``run.inputs`` (per-feature mean/std/min/max, every N steps),
  aggregated over records (min of min, max of max, median of mean and std).
  Rule: some feature has ``max(|min|, |max|) > RANGE`` (10: clearly neither
  standardised nor in [0, 1]), or the largest/smallest positive std ratio is
  > ``STD_RATIO`` (100) while the largest std is > 1. Severity: ``warning``.
  Judged after the model's own input scaling (run_info ``input_scaling``: a
  ``Normalization`` or ``Rescaling`` layer maps the statistics, a
  standardising layer leaves nothing to judge), so a model that scales its
  inputs is not told to add the layer it has; one whose scaling does not fit
  the data is told so.

class_imbalance
  Signal: ``run.labels`` / ``run.predictions`` class counts, summed over
  records. Rule: labels: the majority/minority ratio of the classes present is
  >= ``IMBALANCE`` (10) or the majority share >= ``MAJORITY`` (0.9);
  predictions (last half of records): >= ``COLLAPSE`` (0.95) of predictions
  in one class while that class holds < 0.8 of the labels. Severity:
  ``warning``. With labels recorded and no class above ``BALANCED`` (0.6) of
  them, the collapse is not an imbalance: the remedy says so (class weights
  cannot help) and, for a cross-entropy loss, the evidence compares the final
  training loss with the labels' entropy (a loss >= ``NOTHING_LEARNED`` of it
  means the base rate is all it learned; above ``WORSE_THAN_BASE_RATE`` (1.5x)
  it, the model does worse than the base rate: the training itself failed).
  A multi-label output (`schema.is_multilabel`: sigmoid units) has no
  classes: counts an older writer took of it are ignored.
"""

from __future__ import annotations

import re
import warnings

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.detectors import _robust as R
from tb_stability.detectors import _weight_collapse as collapse
from tb_stability.detectors._tiny_inputs import tiny_inputs
from tb_stability.findings import Finding
from tb_stability.rundata import Matrix, RunData

RANGE = 10.0
STD_RATIO = 100.0
IMBALANCE = 10.0
MAJORITY = 0.9
COLLAPSE = 0.95
NOTHING_LEARNED = 0.9
WORSE_THAN_BASE_RATE = 1.5  # a final loss above this x the labels' entropy: training failed
BALANCED = 0.6
SPREAD_WORTH_NAMING = 10.0  # below it the explanation leaves the spread ratio out
MAX_NAMED_INPUTS = 3

_FEATURE_NAME = re.compile(r"(.+)\[(?:\d+|\*)\]")
_LIST_INPUT = re.compile(r"x(\d+)")


def input_scale(mean, std, lo, hi) -> dict:
    """Summary of per-feature statistics (arrays ``[T, F]``) and the rule's verdict."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo_ = np.nanmin(np.asarray(lo, dtype=np.float64), axis=0)
        hi_ = np.nanmax(np.asarray(hi, dtype=np.float64), axis=0)
        std_ = np.nanmedian(np.asarray(std, dtype=np.float64), axis=0)
        mean_ = np.nanmedian(np.asarray(mean, dtype=np.float64), axis=0)
    extent = np.maximum(np.abs(lo_), np.abs(hi_))
    pos = std_[np.isfinite(std_) & (std_ > 0)]
    ratio = float(pos.max() / pos.min()) if pos.size else 1.0
    big = [int(j) for j in np.flatnonzero(extent > RANGE)]
    spread = ratio > STD_RATIO and pos.size and pos.max() > 1.0
    return {"extent": extent, "std": std_, "mean": mean_, "std_ratio": ratio,
            "large_features": big, "flag": bool(big or spread)}


def imbalance(counts) -> tuple[float, float]:
    """``(majority_share, majority/minority ratio)`` over classes with count > 0."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[np.isfinite(c) & (c > 0)]
    if c.size < 1:
        return float("nan"), float("nan")
    return float(c.max() / c.sum()), float(c.max() / c.min())


def detect_unscaled(run: RunData) -> list[Finding]:
    """unscaled_inputs adapter: judges the values the model's first real layer sees."""
    if not all(k in run.inputs for k in ("mean", "std", "min", "max")):
        return []
    m = run.inputs["std"]
    names = list(m.names) or [str(j) for j in range(m.values.shape[1])]
    view = model_view(C.latest_run_info(run, "input_scaling").get("input_scaling"), names,
                      run.inputs["mean"].values, m.values, run.inputs["min"].values,
                      run.inputs["max"].values)
    s = input_scale(view.mean, view.std, view.lo, view.hi)
    if not s["flag"]:
        raw = input_scale(run.inputs["mean"].values, m.values, run.inputs["min"].values,
                          run.inputs["max"].values)
        tiny = tiny_inputs(run, m, names, s["extent"], raw["extent"], view.layers, view.layer_names)
        return [tiny] if tiny is not None else []
    top = sorted(range(len(names)), key=lambda j: -np.nan_to_num(s["extent"][j]))[:5]
    labels, layer_names = view.layers, view.layer_names
    largest = {}
    for j in top:
        entry = {"min_max_extent": float(s["extent"][j]), "std": float(s["std"][j]),
                 "mean": float(s["mean"][j])}
        if labels[j]:
            entry["after_layer"] = labels[j]
        largest[names[j]] = entry
    flagged = [j for j in s["large_features"] + top[:1] if labels[j]]
    scaled = sorted({labels[j] for j in flagged})
    scaling_layers = sorted({layer_names[j] for j in flagged})
    spread = f"{C.fmt(s['std_ratio'])}x" if s["std_ratio"] >= SPREAD_WORTH_NAMING else ""
    explanation = (
        f"Input features reach |x| = {C.fmt(s['extent'][top[0]])} (feature {names[top[0]]})"
        + (f" and their spreads differ {spread}" if spread else "")
        + "; unscaled inputs saturate units and make the loss surface badly conditioned."
    )
    remedy = _standardise_remedy([names[j] for j in s["large_features"] + top[:1]])
    if scaled:
        explanation = (
            f"The model scales its inputs ({', '.join(scaled)}), yet after that its first layers "
            f"see |x| = {C.fmt(s['extent'][top[0]])} (feature {names[top[0]]})"
            + (f" and spreads that differ {spread}" if spread else "")
            + ": the scaling does not fit the data it is fed."
        )
        remedy = (
            "Fit the scaling to the data training feeds it: adapt the Normalization layer on the "
            "training inputs (the same preprocessing as in fit), or fix the Rescaling factor "
            "(1 / 255 for 8-bit images, 1 / 65535 for 16-bit):\n"
            "    norm.adapt(x_train)  # not a sample of other data, not before other preprocessing\n"
            "    keras.layers.Rescaling(1.0 / x_train.max())"
        )
    return [Finding(
        kind="unscaled_inputs",
        severity="warning",
        run=run.name,
        first_step=int(m.steps[0]),
        last_step=int(m.steps[-1]),
        layers=scaling_layers,
        evidence={
            "largest_features": largest,
            "features_outside_range": len(s["large_features"]),
            "std_ratio_max_to_min": s["std_ratio"],
            "threshold": f"max |x| > {RANGE:g}, or std ratio > {STD_RATIO:g} with max std > 1",
        },
        explanation=explanation,
        remedy=remedy,
    )]


def input_key(feature: str) -> str | None:
    """The input a feature belongs to (``"age"`` of ``"age[0]"``), or None for an unnamed one.

    The instrumentation names features ``<input>[j]`` (``<input>[*]`` for an
    input summarised as one feature): ``x`` for a single input, ``x0``, ``x1``
    ... for a list of inputs, the key for a dict of inputs.
    """
    match = _FEATURE_NAME.fullmatch(feature)
    return match.group(1) if match else None


def _standardise_remedy(flagged: list[str]) -> str:
    """Normalization snippet: one layer for a single input, one per named input of a multi-input model."""
    keys = list(dict.fromkeys(k for k in map(input_key, flagged) if k is not None))
    if not keys or keys == ["x"]:
        return ("Standardise the features (fit on training data only):\n"
                "    norm = keras.layers.Normalization()\n"
                "    norm.adapt(x_train)\n"
                "    model = keras.Sequential([keras.Input(x_train.shape[1:]), norm, ...])\n"
                "    # or: x = sklearn.preprocessing.StandardScaler().fit_transform(x)")
    shown = keys[:MAX_NAMED_INPUTS]
    lines = [f"Standardise the input {shown[0]} (fit on training data only) with a Normalization "
             "layer right after its keras.Input:" if len(shown) == 1 else
             f"Standardise the inputs {', '.join(shown)} (fit on training data only), each with a "
             "Normalization layer of its own right after its keras.Input:"]
    for key in shown:
        listed = _LIST_INPUT.fullmatch(key)
        ref = listed.group(1) if listed else repr(key)
        lines += ["    norm = keras.layers.Normalization()",
                  f"    norm.adapt(x_train[{ref}])",
                  f"    scaled = norm(inputs[{ref}])  # build the model on this instead of inputs[{ref}]"]
    return "\n".join(lines)


class ModelView:
    """Per-feature statistics ``[T, F]`` as the model's first real layer sees them.

    Attributes:
      mean, std, lo, hi: The statistics, NaN where a layer standardises the
        feature (nothing left to judge).
      scaled_by: Per feature, the run_info ``scaling`` applied to it, or None.
    """

    def __init__(self, mean, std, lo, hi, scaled_by):
        self.mean, self.std, self.lo, self.hi = mean, std, lo, hi
        self.scaled_by = scaled_by

    @property
    def layers(self) -> list[str]:
        """Per feature, ``"<class> '<name>'"`` of the layer that scaled it, or ""."""
        return [f"{s.get('class', 'scaling')} '{s.get('layer', '?')}'" if s else ""
                for s in self.scaled_by]

    @property
    def layer_names(self) -> list[str]:
        """Per feature, the name of the layer that scaled it, or ""."""
        return [str(s.get("layer", "")) if s else "" for s in self.scaled_by]


def model_view(scaling, names, mean, std, lo, hi) -> ModelView:
    """Applies the model's own input scaling (run_info ``input_scaling``) to the batch statistics.

    Features are named ``<key>[j]`` (`instrumentation.data_stats`): ``x`` for
    a single input, ``x<i>`` by position, else the input's dict key or name.
    An affine scaling maps mean, spread and range feature by feature; a
    standardising layer leaves nothing to judge (NaN). Features of inputs fed
    as they are, or that cannot be matched, keep their raw statistics.
    """
    arrays = [np.array(a, dtype=np.float64, copy=True) for a in (mean, std, lo, hi)]
    mean, std, lo, hi = arrays
    scaled_by: list = [None] * len(names)
    entries = [e for e in scaling or [] if isinstance(e, dict)]
    for j, name in enumerate(names):
        key, _, index = str(name).rpartition("[")
        scaled = _scaling_for(entries, key)
        if not isinstance(scaled, dict) or j >= mean.shape[1]:
            continue
        affine = scaled.get("affine")
        if scaled.get("normalized"):
            for a in arrays:
                a[:, j] = np.nan
            scaled_by[j] = scaled
            continue
        if not isinstance(affine, dict):
            continue
        factor = _per_feature(affine.get("scale"), index.rstrip("]"))
        offset = _per_feature(affine.get("offset"), index.rstrip("]"))
        if factor is None or offset is None:
            continue
        mean[:, j] = mean[:, j] * factor + offset
        std[:, j] = std[:, j] * abs(factor)
        ends = np.stack([lo[:, j] * factor + offset, hi[:, j] * factor + offset])
        lo[:, j], hi[:, j] = ends.min(axis=0), ends.max(axis=0)
        scaled_by[j] = scaled
    return ModelView(mean, std, lo, hi, scaled_by)


def _scaling_for(entries: list, key: str):
    """The ``scaling`` of the input that features named ``key[...]`` come from (None: raw)."""
    if key == "x" and len(entries) == 1:
        return entries[0].get("scaling")
    for entry in entries:
        if key in (entry.get("key"), entry.get("name")):
            return entry.get("scaling")
    if key.startswith("x") and key[1:].isdigit():
        position = int(key[1:])
        for entry in entries:
            if entry.get("position") == position:
                return entry.get("scaling")
    return None


def _per_feature(values, index: str):
    """One feature's factor: the value for ``index``, or the one value for all (None: unknown)."""
    if not isinstance(values, list) or not values:
        return None
    if len(values) == 1:
        return float(values[0])
    if index.isdigit() and int(index) < len(values):
        return float(values[int(index)])
    return None


def majority_prediction_share(pred: Matrix | None, majority) -> float | None:
    """Share of the majority class among predictions (second half of training), or None."""
    if pred is None or not len(pred) or pred.values.shape[1] < 2:
        return None
    names = [str(n) for n in pred.names]
    if str(majority) not in names:
        return None
    counts = np.nansum(pred.values[len(pred) // 2:], axis=0)
    total = counts.sum()
    if not total > 0:
        return None
    return float(counts[names.index(str(majority))] / total)


def detect_imbalance(run: RunData) -> list[Finding]:
    """class_imbalance adapter (labels and collapsed predictions)."""
    if C.multilabel(run):
        return []
    out = []
    lab: Matrix | None = run.labels
    label_share = None
    if lab is not None and len(lab) and lab.values.shape[1] >= 2:
        counts = np.nansum(lab.values, axis=0)
        share, ratio = imbalance(counts)
        top = int(np.argmax(counts))
        label_share = float(counts[top] / counts.sum()) if counts.sum() > 0 else None
        if np.isfinite(share) and (ratio >= IMBALANCE or share >= MAJORITY):
            dist = {str(lab.names[j]): float(counts[j]) for j in range(len(counts))}
            evidence = {"label_counts": dist, "majority_share": share, "majority_to_minority": ratio,
                        "threshold": f"majority/minority >= {IMBALANCE:g} or majority share >= {MAJORITY:g}; "
                        "info when predictions keep the minority classes"}
            handled = majority_prediction_share(run.predictions, lab.names[top])
            if handled is not None:
                evidence["prediction_majority_share"] = handled
            # The model predicts the minority classes at least half as often as they occur.
            severity = "info" if handled is not None and 1 - handled >= 0.5 * (1 - share) else "warning"
            explanation = (
                f"Class {lab.names[top]} holds {share:.0%} of the labels ({C.fmt(ratio)}x the rarest "
                "class); the model can score well by ignoring the minority classes."
            )
            if severity == "info":
                explanation += (
                    f" Its predictions are {handled:.0%} class {lab.names[top]} against {share:.0%} "
                    "of the labels, so it still predicts the minority classes (class weights or "
                    "resampling, if you use them, are working)."
                )
            out.append(Finding(
                kind="class_imbalance", severity=severity, run=run.name,
                first_step=int(lab.steps[0]), last_step=int(lab.steps[-1]),
                evidence=evidence,
                explanation=explanation,
                remedy=(
                    "Weight the classes inversely to their frequency (or resample), and track "
                    "per-class metrics:\n"
                    "    counts = np.bincount(y_train)\n"
                    "    class_weight = {i: len(y_train) / (len(counts) * c) for i, c in enumerate(counts)}\n"
                    "    model.fit(x, y, class_weight=class_weight)\n"
                    "    model.compile(..., metrics=[keras.metrics.AUC(), keras.metrics.Recall()])"
                ),
            ))
    pred: Matrix | None = run.predictions
    if pred is not None and len(pred) and pred.values.shape[1] >= 2:
        counts = np.nansum(pred.values[len(pred) // 2:], axis=0)
        total = counts.sum()
        if total > 0:
            top = int(np.argmax(counts))
            share = float(counts[top] / total)
            if share >= COLLAPSE and (label_share is None or label_share < 0.8):
                evidence = {"prediction_share": share, "predicted_class": str(pred.names[top]),
                            "label_majority_share": label_share,
                            "threshold": f"one predicted class >= {COLLAPSE:g} while labels < 0.8"}
                explanation = (f"{share:.0%} of the predictions are class {pred.names[top]}: the "
                               "model collapsed to one class.")
                if label_share is None or label_share > BALANCED:
                    remedy = (
                        "Use class weights or a focal loss and check the output layer/loss pairing:\n"
                        "    model.fit(x, y, class_weight=class_weight)\n"
                        "    loss = keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True)"
                    )
                else:
                    explanation += _nothing_learned(run, label_share, evidence)
                    remedy = BALANCED_COLLAPSE_REMEDY
                # Weights pulled to zero: not the classes.
                explanation, remedy, evidence = collapse.blame(collapse.cause(run), explanation,
                                                               remedy, evidence)
                out.append(Finding(
                    kind="class_imbalance", severity="warning", run=run.name,
                    first_step=int(pred.steps[len(pred) // 2]), last_step=int(pred.steps[-1]),
                    evidence=evidence, explanation=explanation, remedy=remedy,
                ))
    return out


BALANCED_COLLAPSE_REMEDY = (
    "Class weights will not help with balanced labels. Check that the labels line up with the "
    "inputs (x and y shuffled or joined separately), that the features carry signal (a small "
    "model must overfit a few hundred samples; if it cannot, the data or the labels are "
    "wrong), the output layer/loss pairing, and the learning rate (too high kills units, too "
    "low stalls):\n"
    "    model.fit(x[:256], y[:256], epochs=200)  # the training loss must approach 0"
)


def _nothing_learned(run: RunData, label_share: float, evidence: dict) -> str:
    """Why a collapse on balanced labels is not an imbalance; adds the loss evidence it uses."""
    text = (f" The labels are not imbalanced (the largest class holds {label_share:.0%}), so the "
            "model found nothing that separates the classes.")
    loss, _ = C.loss_series(run)
    entropy = C.label_entropy(run)
    if entropy is None or loss is None:
        return text
    final = R.level(loss.values, at_end=True)
    if not np.isfinite(final):
        return text
    evidence["final_loss"] = final
    evidence["label_entropy"] = entropy
    if final > WORSE_THAN_BASE_RATE * entropy:
        text += (f" The training loss ends at {C.fmt(final)}, {C.fmt(final / entropy)}x the "
                 f"entropy of the labels ({C.fmt(entropy)}), the loss of always predicting the "
                 "class shares: the model does worse than knowing nothing, so the training "
                 "itself is failing (a learning rate too large, a diverging run): fix that first.")
    elif final >= NOTHING_LEARNED * entropy:
        text += (f" The training loss ends at {C.fmt(final)}, the entropy of the labels "
                 f"({C.fmt(entropy)}): the model predicts the base rate and has learned nothing.")
    return text
