"""Which layers a Keras model has, and which of them produce its outputs.

Shared by the activation probes (`instrumentation.probes`: which layers to
wrap, which are output layers), the configuration check
(`instrumentation.config_check`: the output activation) and the NaN-origin
replay (`instrumentation.nan_origin`: which layer first turns non-finite).
"""

from __future__ import annotations

import tensorflow as tf


def all_layers(model) -> list:
    """Every layer of ``model``, nested ones included (not the model itself)."""
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=False, recursive=True))
    return list(getattr(model, "layers", []))


def output_layers(model) -> set:
    """Layers producing the model's outputs (last layer for subclassed models)."""
    found = set()
    try:
        for tensor in tf.nest.flatten(model.outputs):
            history = getattr(tensor, "_keras_history", None)
            if history is not None:
                found.add(history[0] if not hasattr(history, "operation") else history.operation)
    except Exception:  # noqa: BLE001 - subclassed models have no outputs
        pass
    if not found:
        layers = [layer for layer in all_layers(model) if not getattr(layer, "_layers", None)]
        if layers:
            found.add(layers[-1])
    return found
