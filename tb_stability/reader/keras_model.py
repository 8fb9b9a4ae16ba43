"""The compiled model Keras' TensorBoard callback records in an ordinary log.

With ``write_graph=True`` (its default) ``keras.callbacks.TensorBoard`` writes
the model's JSON once per fit into the training run: tag ``keras``, plugin
``graph_keras_model`` (TensorBoard's graph dashboard shows it). Besides the
layers it holds ``compile_config``: the optimizer with its learning rate,
momentum and clipping, and the loss. `compiled_model` turns that JSON into
the fields the instrumentation writes into ``stability/run_info``
(``optimizer``, ``optimizer_config``, ``loss_name``, ``from_logits``,
``output_activation``, ``output_units``), so that a remedy for an ordinary
log names the run's own optimizer, and ``config_mismatch`` checks its output
activation against its loss.

Only what the JSON states is taken: the output activation of a Sequential or
functional model whose output layer says it (a ``Dense`` or convolution's
``activation``, an ``Activation`` or ``Softmax`` layer), else None. A
functional model with several outputs gets one entry per output under
``outputs``, each with its own loss (a list of losses by position, a dict by
output name, or the one loss for all), as the instrumentation records it, so
no rule pairs one output's loss with another's activation.
"""

from __future__ import annotations

import json
from typing import Any

from tb_stability import schema

PLUGIN_NAME = "graph_keras_model"

# Layers whose "activation" is what they output, and layers that are one.
_ACTIVATED = frozenset({"Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose",
                        "Conv2DTranspose", "Conv3DTranspose", "SeparableConv1D",
                        "SeparableConv2D", "DepthwiseConv1D", "DepthwiseConv2D", "Activation"})
_ACTIVATION_LAYERS = {"Softmax": "softmax", "ReLU": "relu"}
_SEQUENTIAL_TAIL = frozenset({"Dropout", "InputLayer"})  # pass their input through at inference


def compiled_model(text: bytes | str, label: str, warnings: list[str]) -> dict[str, Any]:
    """The run_info fields of one recorded model JSON, or ``{}``.

    Args:
      text: The ``keras`` tag's string value (``model.to_json()``).
      label: How a warning names the file.
      warnings: Where an undecodable record is reported (the run's warnings).
    """
    try:
        model = json.loads(text)
    except (ValueError, UnicodeDecodeError) as error:
        warnings.append(f"{label}: could not decode the Keras model config ({error}); ignored it")
        return {}
    if not isinstance(model, dict):
        return {}
    out: dict[str, Any] = {}
    compiled = model.get("compile_config")
    compiled = compiled if isinstance(compiled, dict) else {}
    out.update(_optimizer_fields(compiled.get("optimizer")))
    outputs = _output_layers(model)
    if len(outputs) > 1:
        losses = _losses_by_output(compiled.get("loss"), [name for name, _ in outputs])
        out["outputs"] = [{"output": name, "output_layer": _layer_name(layer),
                           **(_output_fields(layer) if layer is not None else {}),
                           **_loss_fields(loss)}
                          for (name, layer), loss in zip(outputs, losses)]
        return out
    out.update(_loss_fields(compiled.get("loss")))
    if outputs and outputs[0][1] is not None:
        out.update(_output_fields(outputs[0][1]))
    return out


def _losses_by_output(loss, names: list[str]) -> list:
    """The loss of each output: by position (a list), by name (a dict), else the one loss."""
    if isinstance(loss, list):
        return [loss[i] if i < len(loss) else None for i in range(len(names))]
    if isinstance(loss, dict) and not isinstance(loss.get("class_name"), str):
        return [loss.get(name) for name in names]
    return [loss] * len(names)


def _optimizer_fields(optimizer) -> dict[str, Any]:
    """``optimizer`` (class name) and ``optimizer_config`` as run_info holds them."""
    if isinstance(optimizer, str) and optimizer.isidentifier():  # compile("adam")
        return {"optimizer": optimizer, "optimizer_config": {}}
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("class_name"), str):
        return {}
    config = optimizer.get("config")
    return {"optimizer": optimizer["class_name"],
            "optimizer_config": config if isinstance(config, dict) else {}}


def _loss_fields(loss) -> dict[str, Any]:
    """``loss_name`` and ``from_logits`` of one loss (a name, a serialised Loss or function)."""
    if isinstance(loss, str):
        return {"loss_name": schema.snake_case(loss), "from_logits": False}
    if not isinstance(loss, dict) or not isinstance(loss.get("class_name"), str):
        return {}  # none, or one loss per output
    config = loss.get("config")
    if loss["class_name"] == "function" and isinstance(config, str):  # keras.losses.mse
        return {"loss_name": schema.snake_case(config), "from_logits": False}
    out = {"loss_name": schema.snake_case(loss["class_name"]), "from_logits": False}
    if isinstance(config, dict) and "from_logits" in config:
        out["from_logits"] = bool(config["from_logits"])
    return out


def _output_layers(model: dict) -> list[tuple[str | None, dict | None]]:
    """``(output name, layer config)`` per output, in the recorded order; ``[]`` if unknown.

    A Sequential model has one output, its last layer that is not a pass-through.
    A functional model lists ``output_layers`` as ``[name, node, tensor]``
    triples, or as a dict of them by output key; a layer the config does not
    hold is None.
    """
    config = model.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("layers"), list):
        return []
    layers = [layer for layer in config["layers"] if isinstance(layer, dict)]
    if model.get("class_name") == "Sequential":
        tail = [layer for layer in layers if layer.get("class_name") not in _SEQUENTIAL_TAIL]
        return [(None, tail[-1])] if tail else []
    outputs = config.get("output_layers")
    if _is_output_ref(outputs):
        outputs = [outputs]  # one output: [name, node, tensor]
    if isinstance(outputs, dict):
        pairs = [(str(key), ref) for key, ref in outputs.items() if _is_output_ref(ref)]
    elif isinstance(outputs, list):
        pairs = [(ref[0], ref) for ref in outputs if _is_output_ref(ref)]
    else:
        return []
    by_name = {_layer_name(layer): layer for layer in layers}
    return [(name, by_name.get(ref[0])) for name, ref in pairs]


def _is_output_ref(ref) -> bool:
    return isinstance(ref, list) and len(ref) == 3 and isinstance(ref[0], str)


def _layer_name(layer: dict | None):
    if layer is None:
        return None
    return layer.get("name", (layer.get("config") or {}).get("name"))


def _output_fields(layer: dict) -> dict[str, Any]:
    """``output_activation`` and ``output_units`` where the output layer states them."""
    cls, config = layer.get("class_name"), layer.get("config")
    if not isinstance(config, dict):
        return {}
    out: dict[str, Any] = {}
    if cls in _ACTIVATION_LAYERS:
        out["output_activation"] = _ACTIVATION_LAYERS[cls]
    elif cls in _ACTIVATED and "activation" in config:
        name = _activation_name(config["activation"])
        if name is not None:
            out["output_activation"] = name
    units = config.get("units", config.get("filters"))
    if isinstance(units, int) and not isinstance(units, bool):
        out["output_units"] = units
    return out


def _activation_name(activation) -> str | None:
    """``"softmax"`` from ``"softmax"``, a serialised function, or None (linear: ``"linear"``)."""
    if activation is None:
        return "linear"
    if isinstance(activation, str):
        return activation.lower()
    if isinstance(activation, dict):
        config = activation.get("config")
        if activation.get("class_name") == "function" and isinstance(config, str):
            return config.lower()
    return None
