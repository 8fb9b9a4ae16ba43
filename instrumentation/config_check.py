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
  labels: use the sparse loss);
* a BatchNormalization layer that normalises each feature over one or two
  values (batch size 1 after a Dense layer: `batch_norm_problems`), with the
  batch size recorded as ``batch_size``.

The output activation is only reported for models with symbolic outputs
(Sequential, functional); a subclassed model's ``call`` may apply anything. A
model with several outputs is checked output by output, each against its own
loss (`losses_by_output`), and records its fields per output under
``outputs``.

`layer_activations` adds ``layer_activations``: for every layer with an
``activation`` attribute (recurrent cells included), keyed by the layer's
path (the prefix of its variables' names), its class, activation name and
kind, and for recurrent cells the gate activation and units. The gradient
detectors use it to say which activation shrinks the gradient and to suggest
a fix that fits the layer (an LSTM is not fixed like a Dense layer).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from instrumentation.activation_kinds import activation_name, classify
from instrumentation.input_scaling import input_scaling
from instrumentation.model_layers import all_layers, producing_layer
from tb_stability import schema

MAX_LAYERS_DESCRIBED = 512
_CLASSIFICATION = ("crossentropy", "hinge", "focal", "kl_divergence", "kld", "poisson")


def loss_info(model) -> dict:
    """``{"loss_name", "from_logits"}`` of the loss of the model's first output."""
    return describe_loss(losses_by_output(model, 1)[0])


def describe_loss(loss) -> dict:
    """``{"loss_name", "from_logits"}`` of one compiled loss (a name, a callable or a Loss)."""
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
    return {"loss_name": schema.snake_case(name), "from_logits": from_logits}


def losses_by_output(model, count: int, names: Sequence[str] = ()) -> list:
    """The compiled loss of each of ``count`` outputs, in ``model.outputs`` order.

    A single loss applies to every output; a list or tuple goes by position; a
    dict by output name (``model.output_names``) or, for a model whose outputs
    are a dict, by its keys (``model.outputs`` follows their sorted order).
    None where an output has no loss or the mapping is unclear.
    """
    loss = getattr(model, "loss", None)
    if isinstance(loss, (list, tuple)):
        return [loss[i] if i < len(loss) else None for i in range(count)]
    if not isinstance(loss, dict):
        return [loss] * count
    if any(name in loss for name in names):
        return [loss.get(name) for name in names]
    struct = getattr(model, "_outputs_struct", None)
    if isinstance(struct, dict) and len(struct) == count:
        return [loss.get(key) for key in sorted(struct)]
    if count == 1 and len(loss) == 1:
        return list(loss.values())
    return [None] * count


def output_entries(model) -> list[dict]:
    """One entry per model output, in ``model.outputs`` order (that of the flattened predictions).

    Each holds ``output`` (its name), ``output_layer``, ``output_activation``,
    ``output_units`` and its loss's ``loss_name`` and ``from_logits``. A model
    without symbolic outputs (subclassed) gets one entry whose output fields
    are None: its ``call`` may apply anything.
    """
    tensors = []
    try:
        tensors = list(tf.nest.flatten(model.outputs)) if getattr(model, "outputs", None) else []
    except Exception:  # noqa: BLE001 - subclassed models raise
        tensors = []
    if not tensors:
        entry = {"output": None, "output_layer": None, "output_activation": None,
                 "output_units": None}
        entry.update(loss_info(model))
        return [entry]
    names = []
    try:
        names = [str(n) for n in (getattr(model, "output_names", None) or [])]
    except Exception:  # noqa: BLE001
        names = []
    layers = [producing_layer(tensor) for tensor in tensors]
    if len(names) != len(tensors):
        names = [getattr(layer, "name", f"output_{i}") for i, layer in enumerate(layers)]
    losses = losses_by_output(model, len(tensors), names)
    entries = []
    for tensor, name, layer, loss in zip(tensors, names, layers, losses):
        entry = {"output": name, "output_layer": getattr(layer, "name", None),
                 "output_activation": _output_activation(layer), "output_units": None}
        try:
            units = tensor.shape[-1]
            entry["output_units"] = int(units) if units is not None else None
        except Exception:  # noqa: BLE001
            entry["output_units"] = getattr(layer, "units", None)
        entry.update(describe_loss(loss))
        entries.append(entry)
    return entries


def _output_activation(layer) -> str:
    kind = type(layer).__name__
    if kind == "Softmax":
        return "softmax"
    if kind in ("ReLU", "LeakyReLU", "ELU", "PReLU"):
        return kind.lower()
    fn = getattr(layer, "activation", None)
    return activation_name(fn) if fn is not None else "linear"


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
    """``(mode, logits)`` of the first output (whose labels and predictions the data statistics take).

    ``mode`` is ``"binary"``/``"categorical"``/None; ``logits`` whether its
    outputs are logits. None for a multi-label output (`schema.is_multilabel`): the
    arg-max of a multi-hot row is no class, so no class counts are taken.
    """
    entry = output_entries(model)[0]
    name, act = entry["loss_name"], entry["output_activation"]
    is_cls = any(k in name for k in _CLASSIFICATION) or act in ("sigmoid", "softmax")
    if not is_cls or schema.is_multilabel(name, act, entry["output_units"]):
        return None, False
    logits = bool(entry["from_logits"]) or (act == "linear" and "crossentropy" in name)
    return ("binary" if entry["output_units"] == 1 else "categorical"), logits


def check_config(model, label_range: Optional[tuple[float, float]] = None,
                 batch_rows: Optional[int] = None) -> dict:
    """The run_info fields and extra problems (see module docstring).

    A model with one output records its fields at the top level. One with
    several records them per output under ``outputs`` (the label range with
    the first output, whose labels the data statistics read) and leaves the
    top-level fields None, so no rule pairs one output's loss with another's
    activation; its problems name their output.

    Args:
      model: The compiled Keras model.
      label_range: ``(min, max)`` of the labels of the first probed batch
        (of the first output's labels).
      batch_rows: The most rows a probed batch had (per replica): the batch
        size, recorded as ``batch_size``.

    Returns:
      A dict to merge into ``stability/run_info``.
    """
    entries = output_entries(model)
    lo, hi = (label_range if label_range is not None else (None, None))
    lo, hi = _finite(lo), _finite(hi)
    problems: list[dict] = []
    for i, entry in enumerate(entries):
        entry["label_min"], entry["label_max"] = (lo, hi) if i == 0 else (None, None)
        prefix = f"output '{entry['output']}': " if len(entries) > 1 else ""
        problems += _output_problems(entry, prefix)
    fields = ("output_layer", "output_activation", "output_units", "from_logits", "loss_name",
              "label_min", "label_max")
    out = {key: entries[0][key] if len(entries) == 1 else None for key in fields}
    if len(entries) > 1:
        out["outputs"] = entries
    problems += batch_norm_problems(model, batch_rows)
    out["batch_size"] = batch_rows
    out["config_check"] = {"ok": not problems, "problems": problems}
    out["layer_activations"] = layer_activations(model)
    out["input_scaling"] = input_scaling(model)
    return out


def _output_problems(entry: dict, prefix: str = "") -> list[dict]:
    """The problems of one output the detector's own rules do not cover."""
    name, act, units = entry["loss_name"], entry["output_activation"], entry["output_units"]
    lo, hi = entry["label_min"], entry["label_max"]
    layer = entry["output_layer"]
    problems: list[dict] = []
    if act == "softmax" and units == 1:
        problems.append(_problem(
            prefix + "softmax over a single output unit always outputs 1.0: nothing can be learned.",
            "keras.layers.Dense(1, activation='sigmoid'); loss='binary_crossentropy'",
            "critical", layer))
    categorical = "categorical" in name and "sparse" not in name
    if act == "sigmoid" and units and units > 1 and "categorical" in name:
        problems.append(_problem(
            prefix + f"sigmoid outputs with {name}: the {units} probabilities do not sum to 1 "
            "(multi-label outputs need binary_crossentropy).",
            "keras.layers.Dense(units, activation='softmax')  # single-label classes\n"
            "    # or: loss='binary_crossentropy' for multi-label outputs",
            "warning", layer))
    if "sparse" in name and units and lo is not None and hi is not None and (lo < 0 or hi > units - 1):
        problems.append(_problem(
            prefix + f"sparse categorical labels in [{lo:g}, {hi:g}] but the output has {units} "
            f"classes (valid labels are 0..{units - 1}).",
            f"keras.layers.Dense(n_classes)  # n_classes > {hi:g}; or re-encode labels to 0..n-1",
            "critical", layer))
    if categorical and lo is not None and hi is not None and (lo < 0 or hi > 1):
        problems.append(_problem(
            prefix + f"{name} expects one-hot labels but got labels in [{lo:g}, {hi:g}].",
            "loss='sparse_categorical_crossentropy'  # integer labels\n"
            "    # or: y = keras.utils.to_categorical(y, n_classes)",
            "warning", layer))
    return problems


def batch_norm_problems(model, batch_rows: Optional[int]) -> list[dict]:
    """BatchNormalization layers that normalise each feature over one or two values.

    In training a BatchNormalization layer normalises each feature over the
    batch and every axis but its own (a Dense layer's output: over the batch
    alone). Over one value every feature becomes its offset ``beta`` whatever
    the input, so nothing after the layer sees the data and no gradient
    reaches the layers before it (a ReLU after it reads as dead); over two,
    every feature becomes ``beta +- gamma``. Frozen layers (``trainable=False``
    runs in inference mode) are skipped, and so is a layer whose input shape
    is unknown beyond its rank.
    """
    if not batch_rows:
        return []
    problems = []
    for layer in all_layers(model):
        if not isinstance(layer, keras.layers.BatchNormalization) or not layer.trainable:
            continue
        per_row = _values_per_row(layer)
        if per_row is None or batch_rows * per_row > 2:
            continue
        values = batch_rows * per_row
        path = str(getattr(layer, "path", None) or layer.name)
        outcome = ("its offset beta for every input: nothing after it sees the data and no "
                   "gradient reaches the layers before it" if values == 1 else
                   "beta +- gamma: each feature keeps only which of the two rows is larger")
        problems.append(_problem(
            f"BatchNormalization '{path}' normalises each feature over {values} value(s) per "
            f"batch (batch size {batch_rows}), so in training it outputs {outcome}.",
            "model.fit(x, y, batch_size=32)  # BatchNorm needs many rows per batch\n"
            "    # or, for small batches: keras.layers.LayerNormalization() in its place",
            "critical" if values == 1 else "warning", path) | {"batch_norm_values": values})
    return problems


def _values_per_row(layer) -> Optional[int]:
    """How many values one row gives each feature of a BatchNormalization layer (None: unknown)."""
    try:
        shape = tuple(layer.input.shape)
    except Exception:  # noqa: BLE001 - a subclassed model's layer has no symbolic input
        ndim = getattr(getattr(layer, "input_spec", None), "ndim", None)
        return 1 if ndim == 2 else None
    try:
        axis = int(layer.axis) % len(shape)
        sizes = [shape[i] for i in range(1, len(shape)) if i != axis]
        return None if any(size is None for size in sizes) else int(np.prod(sizes, dtype=np.int64))
    except Exception:  # noqa: BLE001 - an exotic axis: unknown, never fatal
        return None


def _problem(message: str, remedy: str, severity: str, layer) -> dict:
    out = {"message": message, "remedy": "    " + remedy, "severity": severity}
    if layer:
        out["layer"] = layer
    return out


def _finite(value) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if value == value and abs(value) != float("inf") else None
