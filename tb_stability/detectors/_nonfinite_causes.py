"""nan_inf texts for a NaN/Inf made by one computation rather than by an update.

The forensic re-run of the first non-finite step (``stability/nan_origin``)
can find every layer output finite and the loss non-finite (``origin:
loss``), or the first non-finite output in one layer (``origin: layer``).
Where the gradient norm did not grow before the onset, no update caused it:
the loss function or that layer computed a log of a non-positive value, a
division by zero or an overflowing exp from finite values, and the remedy
guards that computation rather than lowering the learning rate.
`origin_sentence` tells, for every branch of the rule, where the re-run found
the first NaN/Inf.
"""

from __future__ import annotations

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.detectors import _data_remedies as D
from tb_stability.rundata import RunData

# Substrings of the snake_case names of Keras' own losses.
_BUILT_IN_LOSS_WORDS = ("crossentropy", "hinge", "kl_divergence", "kld", "poisson",
                        "cosine_similarity", "ctc", "dice", "tversky", "circle",
                        "mean_squared", "mean_absolute", "huber", "log_cosh", "logcosh")
_BUILT_IN_LOSS_NAMES = ("mse", "mae", "mape", "msle", "squared_hinge")
_LINEAR_OUTPUTS = ("linear", "none", "")
_PROBABILITY_LOSSES = {"sigmoid": "BinaryCrossentropy", "softmax": "CategoricalCrossentropy"}
MAX_CONSTANT_NAMED = 5


def _custom(name) -> bool:
    """Whether a recorded loss name is not one of Keras' own losses."""
    if not isinstance(name, str) or not name:
        return False
    lowered = name.lower()
    return not (lowered in _BUILT_IN_LOSS_NAMES or any(w in lowered for w in _BUILT_IN_LOSS_WORDS))


def custom_loss_entry(run: RunData) -> dict | None:
    """The recorded output entry (``loss_name``, ``output_layer``, ``output_activation``) of the
    first output trained with a loss that is not one of Keras' own; None if there is none.

    A model with several outputs records them under ``outputs``; one output at the top level.
    """
    info = C.latest_run_info(run, "loss_name")
    entries = info.get("outputs") if isinstance(info.get("outputs"), list) else [info]
    for entry in entries:
        if isinstance(entry, dict) and _custom(entry.get("loss_name")):
            return entry
    return None


def no_update_sentence(at: str, finite_before: bool) -> str:
    """Why no update caused the NaN: nothing grew before it, or it came first."""
    if finite_before:
        return "The gradient norm did not grow before it, so no update caused it."
    return f"No update came before it ({at} is the first step recorded), so none caused it."


def loss_texts(run: RunData, at: str, growth: float, finite_before: bool) -> tuple[str, str]:
    """``(explanation, remedy)`` for a loss that went non-finite on finite model outputs."""
    if finite_before:
        explanation = (
            f"The loss became non-finite at {at} while the gradients before it were healthy "
            f"(grew only {C.fmt(growth)}x), which points at the loss computation (log of 0, "
            "division by 0, or probabilities outside (0, 1))."
        )
    else:
        explanation = (
            f"The loss was non-finite from {at}, before any update could have caused it: that "
            "points at the loss computation (log of 0, division by 0, or probabilities outside "
            "(0, 1)) or at the data."
        )
    entry = custom_loss_entry(run)
    if entry is None:
        remedy = (
            "Use a built-in loss on logits, or clip the log argument in a custom loss:\n"
            "    loss = keras.losses.BinaryCrossentropy(from_logits=True)  # last Dense without sigmoid\n"
            "    # custom loss: tf.math.log(tf.clip_by_value(p, 1e-7, 1.0))\n"
            "Check inputs and labels for NaN (`np.isfinite(x).all()`)."
        )
        return explanation, remedy
    activation = entry.get("output_activation")
    layer = entry.get("output_layer") or "the output layer"
    remedy = (
        f"The custom loss `{entry['loss_name']}` turns finite model outputs into NaN/Inf: keep every log "
        "and sqrt argument and every divisor in it positive, e.g.\n"
        "    tf.math.log(tf.maximum(v, 1e-7))                   # instead of tf.math.log(v)\n"
        "    tf.math.log(tf.clip_by_value(p, 1e-7, 1 - 1e-7))  # a probability: log(p), log(1 - p)\n"
        "    tf.math.divide_no_nan(a, b)                        # instead of a / b"
    )
    built_in = _PROBABILITY_LOSSES.get(str(activation).lower())
    if built_in:
        remedy += (
            f"\nIf it is a crossentropy, the built-in one on logits cannot overflow: drop the "
            f"{activation} of {layer} and use\n"
            f"    loss = keras.losses.{built_in}(from_logits=True)"
        )
    elif isinstance(activation, str) and activation.lower() in _LINEAR_OUTPUTS:
        remedy += (
            f"\nA quantity the model predicts for it to take the log of or divide by (a variance, "
            f"a scale, a probability) needs an output that stays positive; {layer} is linear, "
            "so it goes negative:\n"
            "    var = keras.activations.softplus(raw) + 1e-6  # a variance or scale\n"
            "    p = keras.activations.sigmoid(raw)             # a probability"
        )
    return explanation, remedy


def constant_features(run: RunData, step: int) -> list[tuple[str, float]]:
    """``(feature, value)`` of the inputs constant over the batch recorded at or before ``step``."""
    lo, hi = run.inputs.get("min"), run.inputs.get("max")
    if lo is None or hi is None or not len(lo) or len(lo) != len(hi):
        return []
    rows = np.flatnonzero(np.asarray(lo.steps) <= step)
    row = int(rows[-1]) if rows.size else 0
    low = np.asarray(lo.values[row], dtype=np.float64)
    high = np.asarray(hi.values[row], dtype=np.float64)
    same = np.isfinite(low) & (low == high)
    return [(lo.names[j], float(low[j])) for j in np.flatnonzero(same)]


def layer_texts(run: RunData, origin: dict, at: str, what: str,
                finite_before: bool) -> tuple[str, str]:
    """``(explanation, remedy)`` for a layer whose forward pass made the first NaN/Inf."""
    layer = origin.get("layer")
    explanation = (f"Values became non-finite at {at} ({what}). "
                   f"{origin_sentence(origin, bool(origin.get('layer_input_finite')))} "
                   f"{no_update_sentence(at, finite_before)}")
    remedy = (
        f"Guard the computation in layer {layer}: avoid division by zero, log "
        "of non-positive values and overflowing exp, e.g.\n"
        "    tf.math.divide_no_nan(a, b)        # instead of a / b\n"
        "    tf.math.log(tf.maximum(x, 1e-7))   # instead of tf.math.log(x)\n"
    )
    step = origin.get("step")
    constant = constant_features(run, int(step) if isinstance(step, (int, float)) else 0)
    if constant:
        named = ", ".join(f"{name} = {C.fmt(value)}" for name, value in constant[:MAX_CONSTANT_NAMED])
        more = f" and {len(constant) - MAX_CONSTANT_NAMED} more" \
            if len(constant) > MAX_CONSTANT_NAMED else ""
        several = len(constant) > 1
        explanation += (f" {len(constant)} input feature{'s are' if several else ' is'} "
                        f"constant over the batch ({named}{more}): a standardisation or a norm "
                        f"divides by {'their' if several else 'its'} zero spread (0/0).")
        remedy += ("    (x - mean) / (std + 1e-6)          # a spread of 0 (a constant feature)\n"
                   "or drop the constant features before training.\n")
    remedy += f"Re-run the saved step with `tb-stability replay {run.name}` to check the fix."
    return explanation, remedy


def _rows_txt(origin: dict) -> str:
    """`` (batch rows 0, 5 of 64 in left)`` from a forensic record's ``nonfinite_rows``."""
    parts = []
    for entry in origin.get("nonfinite_rows") or []:
        if not isinstance(entry, dict) or not entry.get("rows"):
            continue
        rows = ", ".join(str(r) for r in entry["rows"])
        more = f" and {entry['count'] - len(entry['rows'])} more" \
            if entry.get("count", 0) > len(entry["rows"]) else ""
        name = f" in {entry['name']}" if entry.get("name") else ""
        parts.append(f"batch row{'s' if entry.get('count', 0) > 1 else ''} {rows}{more} of "
                     f"{entry.get('of')}{name}")
    return f" ({'; '.join(parts)})" if parts else ""


def origin_sentence(origin: dict, inputs_finite: bool = False) -> str:
    """One sentence on where the first non-finite value came from (forensic re-run).

    Args:
      inputs_finite: Say that the layer the re-run names made it from finite inputs.
    """
    kind = origin.get("origin") or origin.get("kind")
    if kind == "layer" and origin.get("layer"):
        return (f"Re-running the step found the first non-finite output in layer "
                f"{origin['layer']}{', from finite inputs' if inputs_finite else ''}.")
    if kind in D.GENERIC:
        part = {"inputs": "input batch", "sample_weights": "sample weights"}.get(kind, kind)
        at = f" of step {origin['step']}" if origin.get("step") is not None else ""
        found = ("re-running the step found them before any layer" if kind == "inputs" else
                 "re-running the step found every layer output finite and the loss non-finite")
        return f"The {part}{at} hold{'s' if kind == 'inputs' else ''} NaN/Inf" \
               f"{_rows_txt(origin)}: {found}."
    if kind == "loss":
        return "Re-running the step found every layer output finite and the loss non-finite."
    if kind in ("gradients", "gradient"):
        variables = origin.get("variables") or origin.get("variable") or []
        if isinstance(variables, str):
            variables = [variables]
        listed = ", ".join(str(v) for v in list(variables)[:5])
        return f"Re-running the step found finite outputs and loss but non-finite gradients of {listed}."
    keys = [k for k in ("origin", "layer", "variables", "step") if origin.get(k) is not None]
    keys = keys or list(origin)[:4]  # a record written by another tool: show what it says
    summary = ", ".join(f"{k}={origin[k]}" for k in keys) or "unknown"
    return f"Recorded origin: {summary}."
