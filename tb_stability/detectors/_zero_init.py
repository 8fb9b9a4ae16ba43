"""Kernels initialised to zero: why a layer is dead or gets no gradient, from the first step.

With every weight of a layer 0 (``kernel_initializer="zeros"``, or a custom
layer's ``add_weight(..., initializer="zeros")``) the layer outputs its bias
for every input: a ReLU after a zero bias is 0 everywhere (dead), and the
gradient it passes back to the layers before it, ``kernel^T x delta``, is 0
too. A zero kernel after it gets no gradient either, as its input is
constant 0. So nothing ever moves: no learning rate helps, and the fix is a
random initialisation. `zero_kernels` finds the kernels whose recorded
weight norm is exactly 0 in every record (a kernel zeroed on purpose, as in
a zero-initialised residual branch, gets a gradient and leaves 0 at once).
"""

from __future__ import annotations

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.rundata import RunData


def zero_kernels(run: RunData) -> list[str]:
    """Kernel-like variables whose recorded weight norm is exactly 0 in every finite record."""
    return [name for name, finite in C.finite_weight_norms(run)
            if finite.size and not np.any(finite)]


def layer_of(variable: str) -> str:
    """The layer a variable belongs to: the path component before its own name."""
    parts = variable.split("/")
    return parts[-2] if len(parts) > 1 else parts[0]


def explanation(kernels: list[str], named: bool = True) -> str:
    """A sentence saying that ``kernels`` are all zeros and what that does.

    Args:
      kernels: The zero kernels.
      named: Name them; else the sentence starts with "They" ("It"), for a
        sentence right after one that named them.
    """
    listed = ", ".join(kernels[:4]) + (", ..." if len(kernels) > 4 else "")
    if not named:
        listed = "It" if len(kernels) == 1 else "They"
    return (f"{listed} {'is' if len(kernels) == 1 else 'are'} exactly 0 in every record: "
            "initialised to zero (kernel_initializer='zeros'). A layer whose weights are all 0 "
            "outputs its bias for every input and passes a gradient of 0 back, so no weight "
            "behind or after it ever gets a gradient, at any learning rate.")


def remedy(kernels: list[str], relu: bool = False) -> str:
    """Initialise ``kernels`` randomly (He for ReLU layers, else Keras' Glorot default)."""
    layers = ", ".join(dict.fromkeys(layer_of(k) for k in kernels[:4]))
    initializer = "he_normal" if relu else "glorot_uniform"
    return (f"Initialise the kernels of {layers} randomly (Keras' default is glorot_uniform; "
            "he_normal before ReLU), never with zeros or one constant:\n"
            f"    keras.layers.Dense(64, kernel_initializer='{initializer}')\n"
            "    # a custom layer: self.add_weight(shape=..., initializer='glorot_uniform')")
