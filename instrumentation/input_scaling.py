"""What the model does to its inputs before its first real layer: scaling inside the model.

The data statistics (`instrumentation.data_stats`) describe the batch as it is
fed to ``fit``. A model that scales its own inputs (a ``Normalization``
layer adapted on the training data, a ``Rescaling(1 / 255)``, a
``BatchNormalization`` first) sees other values: judging the raw ones
reports unscaled inputs that the model never sees. `input_scaling` records,
per model input, the layer that alone consumes it and what that layer does,
so the detector (`tb_stability.detectors.data`) judges the values the first
real layer sees:

* ``{"affine": {"scale": [...], "offset": [...]}}``: ``y = x * scale +
  offset`` per feature (last axis; one value for all). ``Normalization``
  (``(x - mean) / max(sqrt(variance), eps)``, as Keras computes it) and
  ``Rescaling``.
* ``{"normalized": True}``: the layer standardises whatever it gets
  (``BatchNormalization`` and the other normalisation layers), or it is a
  ``Normalization`` whose statistics do not map onto the last axis.

Layers that keep the scale (augmentation, dropout, cropping, reshaping) are
looked past: an image model's ``RandomFlip`` then ``Rescaling(1 / 255)`` scales
its input. An input consumed by any other layer, or by several layers, is
recorded with ``"scaling": None`` (raw). Models without symbolic inputs (subclassed) record
nothing.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from instrumentation.data_stats import MAX_FEATURES  # larger inputs are one feature there
from instrumentation.model_layers import all_layers

_STANDARDISING = ("BatchNormalization", "LayerNormalization", "GroupNormalization",
                  "UnitNormalization", "RMSNormalization")
# Layers that move, crop, drop or augment values without changing their scale:
# the scaling after them is still the scaling of the input (an image model's
# RandomFlip, RandomRotation, then Rescaling(1 / 255)).
_SCALE_PRESERVING = frozenset({
    "RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "RandomCrop",
    "RandomContrast", "RandomBrightness", "RandomErasing", "RandomGaussianBlur", "RandomShear",
    "RandomPerspective", "RandomElasticTransform", "RandomGrayscale", "Resizing", "CenterCrop",
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
    "GaussianDropout", "AlphaDropout", "Reshape", "Flatten", "Permute", "RepeatVector",
    "Cropping1D", "Cropping2D", "Cropping3D", "Identity", "Pipeline"})
MAX_PASS_THROUGH = 16


def input_scaling(model) -> list[dict]:
    """Per model input: ``{"position", "name", "key", "scaling"}`` (see module docstring).

    ``key`` is the input's key where the model takes a dict of inputs (the
    data statistics name features by it), else None.
    """
    try:
        tensors = list(model.inputs) if getattr(model, "inputs", None) else []
    except Exception:  # noqa: BLE001 - subclassed models raise
        return []
    if not tensors:
        return []
    struct = getattr(model, "_inputs_struct", None)
    keys: list[Optional[str]] = [None] * len(tensors)
    if isinstance(struct, dict) and len(struct) == len(tensors):
        keys = [str(k) for k in sorted(struct)]  # model.inputs follows the sorted keys
    consumers = _consumers(model)
    out = []
    for i, tensor in enumerate(tensors):
        scaling = None
        layer, seen = _first_scaling_layer(consumers, tensor)
        if layer is not None:
            try:
                scaling = _scaling_of(layer)
            except Exception:  # noqa: BLE001 - an unreadable layer counts as raw
                scaling = None
        if scaling and "affine" in scaling and _last_axis(seen) != _last_axis(tensor) and max(
                len(scaling["affine"]["scale"]), len(scaling["affine"]["offset"])) > 1:
            # Per-feature factors after a reshape: they no longer line up with the
            # input's features. The input is scaled, by factors we cannot map.
            scaling = {"layer": scaling["layer"], "class": scaling["class"], "normalized": True}
        out.append({"position": i, "name": str(getattr(tensor, "name", "")), "key": keys[i],
                    "scaling": scaling})
    return out


def _consumers(model) -> dict:
    """``{id(tensor): [(layer, node)]}``: every call of a layer of ``model``, by its inputs."""
    found: dict = {}
    for layer in all_layers(model):
        for node in getattr(layer, "_inbound_nodes", None) or []:
            for tensor in getattr(node, "input_tensors", None) or []:
                calls = found.setdefault(id(tensor), [])
                if not any(x is node for _, x in calls):
                    calls.append((layer, node))
    return found


def _first_scaling_layer(consumers: dict, tensor) -> tuple[Any, Any]:
    """``(layer, its input)``: the layer that alone consumes ``tensor``, past scale-preserving ones.

    ``(None, None)`` where the values are shared by several layers on the way.
    """
    for _ in range(MAX_PASS_THROUGH):
        calls = consumers.get(id(tensor), [])
        if len(calls) != 1:
            return None, None
        layer, node = calls[0]
        outputs = list(getattr(node, "output_tensors", None) or [])
        if type(layer).__name__ not in _SCALE_PRESERVING or len(outputs) != 1:
            return layer, tensor
        tensor = outputs[0]
    return None, None


def _last_axis(tensor) -> Optional[int]:
    try:
        return tensor.shape[-1]
    except Exception:  # noqa: BLE001
        return None


def _scaling_of(layer) -> Optional[dict]:
    kind = type(layer).__name__
    if kind in _STANDARDISING:
        return {"layer": layer.name, "class": kind, "normalized": True}
    if kind == "Normalization":
        return _normalization(layer)
    if kind == "Rescaling":
        return _affine(layer, kind, _numbers(layer.scale), _numbers(layer.offset))
    inner = getattr(layer, "inputs", None)
    if inner is not None and hasattr(layer, "layers"):  # a nested model: its own first layer
        nested = input_scaling(layer)
        if len(nested) == 1 and nested[0]["scaling"] is not None:
            return nested[0]["scaling"]
    return None


def _normalization(layer) -> Optional[dict]:
    if getattr(layer, "invert", False):
        return None
    mean, variance = getattr(layer, "mean", None), getattr(layer, "variance", None)
    if mean is None or variance is None:
        return None
    mean, variance = _numbers(mean), _numbers(variance)
    if mean is None or variance is None or mean.size != variance.size:
        return None
    axis = tuple(getattr(layer, "axis", (-1,)) or ())
    if mean.size > 1 and axis != (-1,):
        # Statistics over another axis than the features': scaled, by unknown factors.
        return {"layer": layer.name, "class": "Normalization", "normalized": True}
    sd = np.maximum(np.sqrt(np.maximum(variance, 0.0)), 1e-7)  # keras.config.epsilon()
    return _affine(layer, "Normalization", 1.0 / sd, -mean / sd)


def _affine(layer, kind: str, scale, offset) -> Optional[dict]:
    if scale is None or offset is None:
        return None
    if max(scale.size, offset.size) > MAX_FEATURES:
        return {"layer": layer.name, "class": kind, "normalized": True}
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(offset))):
        return None
    return {"layer": layer.name, "class": kind,
            "affine": {"scale": [float(v) for v in scale], "offset": [float(v) for v in offset]}}


def _numbers(value: Any) -> Optional[np.ndarray]:
    """A layer's number or array as a flat float64 array (None if it is neither)."""
    try:
        return np.asarray(value, dtype=np.float64).reshape(-1)
    except Exception:  # noqa: BLE001 - variables convert; anything else is unknown
        try:
            return np.asarray(value.numpy(), dtype=np.float64).reshape(-1)
        except Exception:  # noqa: BLE001
            return None
