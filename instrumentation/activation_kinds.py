"""What kind of activation a callable is: ReLU family, saturating (with which limits), linear.

Read by the activation probes (`instrumentation.probes`: which statistics a
layer gets) and by the configuration check (`instrumentation.config_check`:
the output activation's name). Known names are looked up; other callables
are evaluated once on a grid.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import tensorflow as tf

RELU_FAMILY = frozenset({"relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "silu",
                         "swish", "celu", "hard_silu", "hard_swish", "mish", "prelu"})
SATURATING = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0), "softmax": (0.0, 1.0),
              "hard_sigmoid": (0.0, 1.0), "softsign": (-1.0, 1.0), "hard_tanh": (-1.0, 1.0)}


def activation_name(fn: Any) -> str:
    """Canonical lower-case name of an activation callable ("" when none)."""
    if fn is None:
        return ""
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return str(name).lower()


def classify(fn: Callable) -> tuple[str, Optional[tuple[float, float]]]:
    """Kind of an activation: ``("relu"|"saturating"|"linear"|"other", limits)``.

    Known names are looked up; custom callables are evaluated once, eagerly,
    on a grid: ``max(x, 0)``-like functions are ReLU family, functions flat at
    both ends are saturating with those limits.
    """
    name = activation_name(fn)
    if name in ("linear", "identity", ""):
        return "linear", None
    if name in RELU_FAMILY:
        return "relu", None
    if name in SATURATING:
        return "saturating", SATURATING[name]
    try:
        with tf.init_scope():
            grid = np.concatenate([[-1e5, -9e4], np.linspace(-50, 50, 201), [9e4, 1e5]])
            ys = np.asarray(fn(tf.constant(grid, tf.float32)), np.float64)
    except Exception:  # noqa: BLE001 - an exotic callable: mean/std only
        return "other", None
    if ys.shape != grid.shape or not np.isfinite(ys[2:-2]).all():
        return "other", None
    if np.allclose(ys, np.maximum(grid, 0.0), rtol=1e-4, atol=1e-4):
        return "relu", None
    if np.allclose(ys, grid, rtol=1e-4, atol=1e-4):
        return "linear", None
    lo, hi = ys[0], ys[-1]
    if np.isfinite([lo, hi]).all() and abs(ys[1] - lo) < 1e-6 and abs(ys[-2] - hi) < 1e-6 \
            and hi - lo > 0 and (ys >= lo - 1e-6).all() and (ys <= hi + 1e-6).all():
        return "saturating", (float(lo), float(hi))
    return "other", None


def never_negative(fn) -> bool:
    """Whether ``fn`` is a known activation whose outputs are never negative.

    Only the functions themselves (what ``activation="relu"`` resolves to): a
    ``ReLU`` layer or a custom callable named "relu" may have a negative slope.
    """
    import keras  # the probes only run under Keras

    return any(fn is known for known in (keras.activations.relu, keras.activations.relu6,
                                         tf.nn.relu, tf.nn.relu6))
