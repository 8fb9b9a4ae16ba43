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
* categorical cross-entropy on a single output unit.

An ordinary log has no run_info; there the same fields come from the
compiled model Keras' TensorBoard callback recorded (`RunData.model_config`,
from its ``keras`` tag): loss, ``from_logits``, the output layer's activation
and units, and no label range.

Severity: ``warning`` (``critical`` when the recorded problem says so).
"""

from __future__ import annotations

from tb_stability.detectors import _common as C
from tb_stability.findings import Finding
from tb_stability.rundata import RunData


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
    return out


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
    keys = ("loss", "loss_name", "output_activation", "from_logits", "label_min", "label_max",
            "output_units", "outputs")
    return [Finding(
        kind="config_mismatch",
        severity="critical" if critical else "warning",
        run=run.name,
        first_step=int(step),
        last_step=int(step),
        layers=[str(p["layer"]) for p in problems if p.get("layer")],
        evidence={"problems": problems, "recorded": {k: info.get(k) for k in keys if k in info},
                  "threshold": "any recorded config_check problem or rule violation"},
        explanation=" ".join(str(p.get("message", "")) for p in problems[:3]),
        remedy="\n".join(str(p.get("remedy", "")) for p in problems if p.get("remedy"))
        or "Make the output activation, the loss and the label range agree, e.g.\n"
           "    keras.layers.Dense(1); loss = keras.losses.BinaryCrossentropy(from_logits=True)",
    )]


def _first_step(run: RunData) -> int:
    """The first step of the run's ordinary scalars (0 without any)."""
    firsts = [int(series.steps[0]) for series in run.scalars.values() if len(series)]
    return min(firsts) if firsts else 0
