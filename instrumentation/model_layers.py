"""Which layers a Keras model has, and which of them produce its outputs.

Shared by the activation probes (`instrumentation.probes`: which layers to
wrap, which are output layers), the configuration check
(`instrumentation.config_check`: the output activation) and the NaN-origin
replay (`instrumentation.nan_origin`: which layer first turns non-finite).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf


def all_layers(model) -> list:
    """Every layer of ``model``, nested ones included (not the model itself)."""
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=False, recursive=True))
    return list(getattr(model, "layers", []))


def producing_layer(tensor) -> Any:
    """The layer (Keras operation) that produced a symbolic Keras tensor, or None."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None
    return history.operation if hasattr(history, "operation") else history[0]


def output_layers(model) -> set:
    """Layers producing the model's outputs (last layer for subclassed models)."""
    found = set()
    try:
        for tensor in tf.nest.flatten(model.outputs):
            layer = producing_layer(tensor)
            if layer is not None:
                found.add(layer)
    except Exception:  # noqa: BLE001 - subclassed models have no outputs
        pass
    if not found:
        layers = [layer for layer in all_layers(model) if not getattr(layer, "_layers", None)]
        if layers:
            found.add(layers[-1])
    return found
