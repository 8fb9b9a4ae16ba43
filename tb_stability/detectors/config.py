"""config_mismatch: output activation, loss and label range that do not fit.

Reads what the instrumentation recorded in ``run.json["stability/run_info"]``
(latest record): a ``config_check`` entry, either a list of problems (strings
or dicts with ``message``/``remedy``) or a dict with ``problems``; plus, when
present, the plain fields ``loss``, ``output_activation``, ``from_logits``,
``label_min``/``label_max`` and ``output_units`` (per output under ``outputs``
for a model with several, each with its own loss), checked with these rules:

* probabilistic output (sigmoid/softmax) with ``from_logits=True``;
* a cross-entropy on a linear output without ``from_logits=True``;
* binary cross-entropy with labels outside [0, 1];
* categorical cross-entropy on a single output unit;
* a regression loss (MSE, MAE, Huber, log-cosh) on a bounded output (sigmoid,
  softmax, tanh) that cannot reach the labels, or on one bounded below (ReLU,
  softplus, exponential, ELU, SELU) with labels below its floor;
* a regression loss on an unbounded output with labels beyond +-``TARGET_SCALE``
  (100): the output starts near 0 and a learning rate that suits unit-scale
  data takes thousands of steps only to reach the targets' offset and scale
  (house prices in dollars under MSE start at a loss of ~1e10 and stay there).

An ordinary log has no run_info; there the same fields come from the
compiled model Keras' TensorBoard callback recorded (`RunData.model_config`,
from its ``keras`` tag): loss, ``from_logits``, the output layer's activation
and units, and no label range.

Severity: ``warning`` (``critical`` when the recorded problem says so).
"""

from __future__ import annotations

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.detectors import _robust as R
from tb_stability.findings import Finding
from tb_stability.rundata import RunData


TARGET_SCALE = 100.0
_REGRESSION_LOSSES = ("mse", "mae", "mean_squared_error", "mean_absolute_error", "huber",
                      "huber_loss", "log_cosh", "logcosh")
_BOUNDED_OUTPUTS = {"sigmoid": (0.0, 1.0), "softmax": (0.0, 1.0), "tanh": (-1.0, 1.0),
                    "hard_sigmoid": (0.0, 1.0), "softsign": (-1.0, 1.0)}
# Outputs bounded below only: the lowest value each can take.
_FLOORED_OUTPUTS = {"relu": 0.0, "softplus": 0.0, "exponential": 0.0, "elu": -1.0,
                    "selu": -1.7581}
_UNBOUNDED_OUTPUTS = ("linear", "none", "", "relu", "softplus", "elu", "selu", "exponential",
                      "leaky_relu", "gelu", "silu", "swish")


def config_problems(info: dict) -> list[dict]:
    """Problems in one run_info record (recorded ones and rule violations).

    The rules run on each entry of ``outputs`` (a model with several outputs,
    each with its own loss), else on the record's own fields.
    """
    out: list[dict] = []
    check = info.get("config_check")
    if isinstance(check, dict):
        check = check.get("problems", [] if check.get("ok", True) else [check])
    for p in check or []:
        out.append(p if isinstance(p, dict) else {"message": str(p)})
    outputs = info.get("outputs")
    if isinstance(outputs, list) and outputs:
        for entry in outputs:
            if isinstance(entry, dict):
                out += _rule_problems(entry, f"output '{entry.get('output')}': ")
    else:
        out += _rule_problems(info)
    return out


def _rule_problems(info: dict, prefix: str = "") -> list[dict]:
    """The detector's own rules on one output's fields."""
    out: list[dict] = []
    loss = C.single_loss_name(info)
    act = str(info.get("output_activation") or "").lower()
    logits = info.get("from_logits")
    lo, hi = info.get("label_min"), info.get("label_max")
    ce = "crossentropy" in loss.replace("_", "")
    if act in ("sigmoid", "softmax") and logits is True:
        out.append({"message": prefix + f"from_logits=True with a {act} output applies {act} "
                                        "twice.",
                    "remedy": f"keep activation='{act}' and use from_logits=False, or drop it:\n"
                              "    keras.layers.Dense(units)  # linear\n"
                              f"    loss = {_logits_loss(loss, act)}"})
    if ce and act in ("linear", "none", "") and info.get("output_activation") is not None \
            and logits is False:
        out.append({"message": prefix + f"{loss} on a linear output expects probabilities but "
                                        "gets logits.",
                    "remedy": f"    loss = {_logits_loss(loss, act)}"})
    if "binary" in loss and lo is not None and hi is not None and (lo < 0 or hi > 1):
        out.append({"message": prefix + f"binary cross-entropy with labels in [{lo}, {hi}], "
                                        "outside [0, 1].",
                    "remedy": "    y = (y > threshold).astype('float32')  # or use MSE for regression"})
    if "categorical" in loss and "sparse" not in loss and info.get("output_units") == 1:
        out.append({"message": prefix + "categorical cross-entropy on a single output unit is "
                                        "always 0.",
                    "remedy": "    keras.layers.Dense(1, activation='sigmoid'); "
                              "loss='binary_crossentropy'"})
    if loss in _REGRESSION_LOSSES and lo is not None and hi is not None:
        out += _target_problems(loss, act, float(lo), float(hi), prefix)
    return out


def _target_problems(loss: str, act: str, lo: float, hi: float, prefix: str) -> list[dict]:
    """A regression loss whose labels the output cannot reach, or reaches only slowly."""
    if act in _BOUNDED_OUTPUTS:
        low, high = _BOUNDED_OUTPUTS[act]
        if lo < low or hi > high:
            return [{"message": prefix + f"{loss} on a {act} output, which stays in "
                                         f"[{low:g}, {high:g}], with labels in [{lo:.4g}, {hi:.4g}]: "
                                         "the model cannot fit them.",
                     "remedy": "    keras.layers.Dense(1)  # a linear output for regression\n"
                               + _STANDARDISE}]
        return []
    floor = _FLOORED_OUTPUTS.get(act)
    if floor is not None and lo < floor - 1e-6 * max(1.0, hi - lo):
        dies = " (and a ReLU output pushed below 0 passes no gradient: it dies)" if act == "relu" else ""
        return [{"message": prefix + f"{loss} on a {act} output, which cannot go below "
                                     f"{floor:g}, with labels in [{lo:.4g}, {hi:.4g}]: the model cannot "
                                     f"fit the labels below {floor:g}{dies}.",
                 "remedy": "    keras.layers.Dense(1)  # a linear output for regression"
                           + ("\n" + _STANDARDISE if max(abs(lo), abs(hi)) > TARGET_SCALE else "")}]
    if act in _UNBOUNDED_OUTPUTS and max(abs(lo), abs(hi)) > TARGET_SCALE:
        return [{"message": prefix + f"{loss} on labels in [{lo:.4g}, {hi:.4g}], far from unit "
                                     "scale: the output starts near 0, so training spends its "
                                     "steps reaching the labels' offset and scale, at a loss "
                                     "dominated by them.",
                 "remedy": _STANDARDISE, "target_scale": True}]
    return []


_STANDARDISE = (
    "    # standardise the targets (fit on training data only), and undo it on predictions:\n"
    "    y_mean, y_std = y_train.mean(axis=0), y_train.std(axis=0)\n"
    "    model.fit(x_train, (y_train - y_mean) / y_std, ...)  # validation targets alike\n"
    "    y_pred = model.predict(x) * y_std + y_mean"
)


_LOGITS_LOSSES = (
    ("sparse_categorical_focal", "SparseCategoricalFocalCrossentropy"),
    ("categorical_focal", "CategoricalFocalCrossentropy"),
    ("binary_focal", "BinaryFocalCrossentropy"),
    ("sparse_categorical", "SparseCategoricalCrossentropy"),
    ("categorical", "CategoricalCrossentropy"),
    ("binary", "BinaryCrossentropy"),
)


def _logits_loss(loss: str, activation: str) -> str:
    """The Keras loss that takes logits in place of ``loss`` (same kind of labels)."""
    for key, cls in _LOGITS_LOSSES:
        if key in loss:
            return f"keras.losses.{cls}(from_logits=True)"
    cls = "CategoricalCrossentropy" if activation == "softmax" else "BinaryCrossentropy"
    return f"keras.losses.{cls}(from_logits=True)"


def detect(run: RunData) -> list[Finding]:
    """config_mismatch adapter."""
    records = run.json.get("stability/run_info") or []
    if records:
        step, info = max(records, key=lambda r: r[0])
    else:  # an ordinary log: the compiled model Keras' TensorBoard callback recorded
        step, info = _first_step(run), run.model_config
    if not isinstance(info, dict) or not info:
        return []
    problems = config_problems(info)
    if not problems:
        return []
    critical = any(str(p.get("severity", "")).lower() == "critical" for p in problems)
    explanation = " ".join(str(p.get("message", "")) for p in problems[:3])
    if any(p.get("target_scale") for p in problems):
        explanation += _loss_progress(run)
    keys = ("loss", "loss_name", "output_activation", "from_logits", "label_min", "label_max",
            "output_units", "batch_size", "outputs")
    return [Finding(
        kind="config_mismatch",
        severity="critical" if critical else "warning",
        run=run.name,
        first_step=int(step),
        last_step=int(step),
        layers=[str(p["layer"]) for p in problems if p.get("layer")],
        evidence={"problems": problems, "recorded": {k: info.get(k) for k in keys if k in info},
                  "threshold": "any recorded config_check problem or rule violation"},
        explanation=explanation,
        remedy="\n".join(str(p.get("remedy", "")) for p in problems if p.get("remedy"))
        or "Make the output activation, the loss and the label range agree, e.g.\n"
           "    keras.layers.Dense(1); loss = keras.losses.BinaryCrossentropy(from_logits=True)",
    )]


def _loss_progress(run: RunData) -> str:
    """Where the training loss started and ended, in a sentence (empty without one)."""
    loss, _ = C.loss_series(run)
    if loss is None or len(loss) < 2:
        return ""
    start, end = R.level(loss.values), R.level(loss.values, at_end=True)
    if not (np.isfinite(start) and np.isfinite(end) and start > 0):
        return ""
    change = (end - start) / start
    return (f" Over this run the loss went from {C.fmt(start)} to {C.fmt(end)} "
            f"({abs(change):.1%} {'lower' if change < 0 else 'higher'}).")


def _first_step(run: RunData) -> int:
    """The first step of the run's ordinary scalars (0 without any)."""
    firsts = [int(series.steps[0]) for series in run.scalars.values() if len(series)]
    return min(firsts) if firsts else 0
