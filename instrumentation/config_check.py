"""config_mismatch at train start: output activation vs loss vs label range.

`check_config` describes the model's output (activation, units), the loss
(name, ``from_logits``) and the label range of the first probed batch, and
lists the problems. Its result is merged into ``stability/run_info``, where
`tb_stability.detectors.config` reads it: the plain fields ``loss``,
``output_activation``, ``output_units``, ``from_logits``, ``label_min``,
``label_max`` (the detector applies its own rules to these: sigmoid/softmax
with ``from_logits=True``, cross-entropy on a linear output, binary
cross-entropy with labels outside [0, 1], categorical cross-entropy on one
unit) and ``config_check = {"ok", "problems"}`` holding only the problems
those rules do not cover (so none is reported twice):

* softmax over a single unit (always outputs 1: nothing is learned);
* sigmoid outputs with a categorical cross-entropy (probabilities that do not
  sum to 1 are renormalised; use softmax);
* sparse categorical labels outside ``[0, units - 1]``;
* categorical (one-hot) cross-entropy with labels outside [0, 1] (integer
  labels: use the sparse loss).

The output activation is only reported for models with symbolic outputs
(Sequential, functional); a subclassed model's ``call`` may apply anything.

`layer_activations` adds ``layer_activations``: for every layer with an
``activation`` attribute (recurrent cells included), keyed by the layer's
path (the prefix of its variables' names), its class, activation name and
kind, and for recurrent cells the gate activation and units. The gradient
detectors use it to say which activation shrinks the gradient and to suggest
a fix that fits the layer (an LSTM is not fixed like a Dense layer).
"""

from __future__ import annotations

from typing import Any, Optional

from instrumentation.activation_kinds import activation_name, classify
from instrumentation.model_layers import all_layers, output_layers

MAX_LAYERS_DESCRIBED = 512
_CLASSIFICATION = ("crossentropy", "hinge", "focal", "kl_divergence", "kld", "poisson")


def loss_info(model) -> dict:
    """``{"loss_name", "from_logits"}`` of the (first) compiled loss."""
    loss = getattr(model, "loss", None)
    if isinstance(loss, dict):
        loss = next(iter(loss.values()), None)
    elif isinstance(loss, (list, tuple)):
        loss = loss[0] if loss else None
    from_logits: Optional[bool] = None
    if isinstance(loss, str):
        name, from_logits = loss, False
    elif loss is None:
        name = ""
    else:
        config = {}
        try:
            config = loss.get_config() if hasattr(loss, "get_config") else {}
        except Exception:  # noqa: BLE001
            config = {}
        name = type(loss).__name__ if hasattr(loss, "get_config") else \
            getattr(loss, "__name__", type(loss).__name__)
        if isinstance(config, dict) and "from_logits" in config:
            from_logits = bool(config["from_logits"])
        elif hasattr(loss, "get_config"):
            from_logits = False
    return {"loss_name": _canonical(name), "from_logits": from_logits}


def output_info(model) -> dict:
    """``{"output_layer", "output_activation", "output_units"}`` (None when unknown)."""
    info: dict[str, Any] = {"output_layer": None, "output_activation": None, "output_units": None}
    try:
        symbolic = bool(getattr(model, "outputs", None))
    except Exception:  # noqa: BLE001 - subclassed models raise
        symbolic = False
    if not symbolic:
        return info
    layers = sorted(output_layers(model), key=lambda layer: layer.name)
    if not layers:
        return info
    layer = layers[0]
    info["output_layer"] = layer.name
    kind = type(layer).__name__
    if kind == "Softmax":
        act = "softmax"
    elif kind in ("ReLU", "LeakyReLU", "ELU", "PReLU"):
        act = kind.lower()
    else:
        fn = getattr(layer, "activation", None)
        act = activation_name(fn) if fn is not None else "linear"
    info["output_activation"] = act
    try:
        units = model.outputs[0].shape[-1]
        info["output_units"] = int(units) if units is not None else None
    except Exception:  # noqa: BLE001
        info["output_units"] = getattr(layer, "units", None)
    return info


def layer_activations(model, limit: int = MAX_LAYERS_DESCRIBED) -> dict:
    """``{layer path: {"class", "activation", "kind", ...}}`` of layers with an activation.

    ``kind`` is `activation_kinds.classify`'s ("relu", "saturating", "linear",
    "other"). Recurrent cells add ``recurrent_activation`` (their gates) and
    ``units``. At most ``limit`` layers are described; a layer that cannot
    be described is skipped.
    """
    out: dict[str, dict] = {}
    for layer in all_layers(model):
        if len(out) >= limit:
            break
        fn = getattr(layer, "activation", None)
        if fn is None or not callable(fn):
            continue
        try:
            path = str(getattr(layer, "path", None) or layer.name)
            entry: dict[str, Any] = {"class": type(layer).__name__,
                                     "activation": activation_name(fn),
                                     "kind": classify(fn)[0]}
            gate = getattr(layer, "recurrent_activation", None)
            if gate is not None and callable(gate):
                entry["recurrent_activation"] = activation_name(gate)
            units = getattr(layer, "units", None)
            if isinstance(units, int):
                entry["units"] = units
        except Exception:  # noqa: BLE001 - an exotic layer is left out, never fatal
            continue
        out[path] = entry
    return out


def classification_mode(model) -> tuple[Optional[str], bool]:
    """``(mode, logits)``: ``"binary"``/``"categorical"``/None and whether outputs are logits."""
    loss = loss_info(model)
    out = output_info(model)
    name = loss["loss_name"]
    act = out["output_activation"]
    is_cls = any(k in name for k in _CLASSIFICATION) or act in ("sigmoid", "softmax")
    if not is_cls:
        return None, False
    logits = bool(loss["from_logits"]) or (act == "linear" and "crossentropy" in name)
    return ("binary" if out["output_units"] == 1 else "categorical"), logits


def check_config(model, label_range: Optional[tuple[float, float]] = None) -> dict:
    """The run_info fields and extra problems (see module docstring).

    Args:
      model: The compiled Keras model.
      label_range: ``(min, max)`` of the labels of the first probed batch.

    Returns:
      A dict to merge into ``stability/run_info``.
    """
    loss = loss_info(model)
    out = output_info(model)
    name, act, units = loss["loss_name"], out["output_activation"], out["output_units"]
    lo, hi = (label_range if label_range is not None else (None, None))
    lo = _finite(lo)
    hi = _finite(hi)
    problems: list[dict] = []
    layer = out["output_layer"]
    if act == "softmax" and units == 1:
        problems.append(_problem(
            "softmax over a single output unit always outputs 1.0: nothing can be learned.",
            "keras.layers.Dense(1, activation='sigmoid'); loss='binary_crossentropy'",
            "critical", layer))
    categorical = "categorical" in name and "sparse" not in name
    if act == "sigmoid" and units and units > 1 and "categorical" in name:
        problems.append(_problem(
            f"sigmoid outputs with {name}: the {units} probabilities do not sum to 1 "
            "(multi-label outputs need binary_crossentropy).",
            "keras.layers.Dense(units, activation='softmax')  # single-label classes\n"
            "    # or: loss='binary_crossentropy' for multi-label outputs",
            "warning", layer))
    if "sparse" in name and units and lo is not None and hi is not None and (lo < 0 or hi > units - 1):
        problems.append(_problem(
            f"sparse categorical labels in [{lo:g}, {hi:g}] but the output has {units} classes "
            f"(valid labels are 0..{units - 1}).",
            f"keras.layers.Dense(n_classes)  # n_classes > {hi:g}; or re-encode labels to 0..n-1",
            "critical", layer))
    if categorical and lo is not None and hi is not None and (lo < 0 or hi > 1):
        problems.append(_problem(
            f"{name} expects one-hot labels but got labels in [{lo:g}, {hi:g}].",
            "loss='sparse_categorical_crossentropy'  # integer labels\n"
            "    # or: y = keras.utils.to_categorical(y, n_classes)",
            "warning", layer))
    return {
        "output_layer": layer,
        "output_activation": act,
        "output_units": units,
        "from_logits": loss["from_logits"],
        "loss_name": name,
        "label_min": lo,
        "label_max": hi,
        "config_check": {"ok": not problems, "problems": problems},
        "layer_activations": layer_activations(model),
    }


def _problem(message: str, remedy: str, severity: str, layer) -> dict:
    out = {"message": message, "remedy": "    " + remedy, "severity": severity}
    if layer:
        out["layer"] = layer
    return out


def _canonical(name: str) -> str:
    """``BinaryCrossentropy`` -> ``binary_crossentropy``; strings kept lower-case."""
    out = []
    for i, ch in enumerate(str(name)):
        if ch.isupper() and i and not str(name)[i - 1].isupper() and str(name)[i - 1] != "_":
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def _finite(value) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if value == value and abs(value) != float("inf") else None
