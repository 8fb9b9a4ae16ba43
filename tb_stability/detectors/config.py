"""config_mismatch: output activation, loss and label range that do not fit.

Reads what the instrumentation recorded in ``run.json["stability/run_info"]``
(latest record): a ``config_check`` entry, either a list of problems (strings
or dicts with ``message``/``remedy``) or a dict with ``problems``; plus, when
present, the plain fields ``loss``, ``output_activation``, ``from_logits``,
``label_min``/``label_max`` and ``output_units``, checked with these rules:

* probabilistic output (sigmoid/softmax) with ``from_logits=True``;
* a cross-entropy on a linear output without ``from_logits=True``;
* binary cross-entropy with labels outside [0, 1];
* categorical cross-entropy on a single output unit.

Severity: ``warning`` (``critical`` when the recorded problem says so).
"""

from __future__ import annotations

from tb_stability.findings import Finding
from tb_stability.rundata import RunData


def config_problems(info: dict) -> list[dict]:
    """Problems in one run_info record (recorded ones and rule violations)."""
    out: list[dict] = []
    check = info.get("config_check")
    if isinstance(check, dict):
        check = check.get("problems", [] if check.get("ok", True) else [check])
    for p in check or []:
        out.append(p if isinstance(p, dict) else {"message": str(p)})
    loss = str(info.get("loss") or "").lower()
    act = str(info.get("output_activation") or "").lower()
    logits = info.get("from_logits")
    lo, hi = info.get("label_min"), info.get("label_max")
    ce = "crossentropy" in loss.replace("_", "")
    if act in ("sigmoid", "softmax") and logits is True:
        out.append({"message": f"from_logits=True with a {act} output applies {act} twice.",
                    "remedy": f"keep activation='{act}' and use from_logits=False, or drop it:\n"
                              "    keras.layers.Dense(units)  # linear\n"
                              "    loss = keras.losses.BinaryCrossentropy(from_logits=True)"})
    if ce and act in ("linear", "none", "") and info.get("output_activation") is not None and logits is False:
        out.append({"message": f"{loss} on a linear output expects probabilities but gets logits.",
                    "remedy": "    loss = keras.losses.BinaryCrossentropy(from_logits=True)"})
    if "binary" in loss and lo is not None and hi is not None and (lo < 0 or hi > 1):
        out.append({"message": f"binary cross-entropy with labels in [{lo}, {hi}], outside [0, 1].",
                    "remedy": "    y = (y > threshold).astype('float32')  # or use MSE for regression"})
    if "categorical" in loss and "sparse" not in loss and info.get("output_units") == 1:
        out.append({"message": "categorical cross-entropy on a single output unit is always 0.",
                    "remedy": "    keras.layers.Dense(1, activation='sigmoid'); loss='binary_crossentropy'"})
    return out


def detect(run: RunData) -> list[Finding]:
    """config_mismatch adapter."""
    records = run.json.get("stability/run_info") or []
    if not records:
        return []
    step, info = max(records, key=lambda r: r[0])
    if not isinstance(info, dict):
        return []
    problems = config_problems(info)
    if not problems:
        return []
    critical = any(str(p.get("severity", "")).lower() == "critical" for p in problems)
    keys = ("loss", "output_activation", "from_logits", "label_min", "label_max", "output_units")
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
