"""Inputs far below unit scale: often scaled twice (``/ 255`` in the pipeline and a ``Rescaling``).

`data.detect_unscaled` judges inputs that are too large. The other side: when
every feature the first real layer sees stays within ``TINY`` (0.01) of 0,
its outputs are its biases and its weights must grow by the missing factor
before the data matters, so the model learns slowly or not at all (pixels
divided by 255 twice reach 1/255: a small CNN ended at the labels' entropy).
Where a model layer scaled inputs that were already within [-1, 1] (their
raw extent), the inputs were scaled twice, and the remedy says to scale once.
Features a model layer standardises are not judged; neither are inputs that
are all 0.
"""

from __future__ import annotations

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.findings import Finding
from tb_stability.rundata import Matrix, RunData

TINY = 0.01


def tiny_inputs(run: RunData, m: Matrix, names: list[str], extent, raw_extent,
                scaled_by: list[str], layer_names: list[str]) -> Finding | None:
    """The unscaled_inputs finding for inputs far below unit scale, or None.

    Args:
      run: The run.
      m: The input statistics matrix (for its steps).
      names: Feature names.
      extent: Per feature, max |x| as the first real layer sees it (NaN: standardised).
      raw_extent: Per feature, max |x| as fed to ``fit``.
      scaled_by: Per feature, the model layer that scaled it (``"Rescaling 'r'"``) or "".
      layer_names: Per feature, that layer's name or "".
    """
    judged = [j for j in range(len(names)) if np.isfinite(extent[j])]
    if not judged:
        return None
    largest = max(float(extent[j]) for j in judged)
    if not 0 < largest <= TINY:
        return None
    raw_largest = float(np.nanmax(raw_extent))
    twice = sorted({scaled_by[j] for j in judged
                    if scaled_by[j] and np.isfinite(raw_extent[j]) and 0 < raw_extent[j] <= 1.0})
    explanation = (
        f"Every input feature the first layer sees stays within |x| <= {C.fmt(largest)}, "
        f"{C.fmt(1 / largest)}x below unit scale: that layer's outputs are its biases, and its "
        "weights must grow as much before the inputs matter, so the model learns slowly or not "
        "at all.")
    if twice:
        explanation += (f" The model's {', '.join(twice)} shrinks inputs that are already within "
                        f"[-1, 1] (raw |x| <= {C.fmt(raw_largest)}): they were "
                        "scaled twice.")
        remedy = ("Scale once: feed the model's scaling layer the raw values (drop the division "
                  "in the input pipeline), or keep that division and drop the layer:\n"
                  "    model.fit(x_raw, y)  # uint8 pixels 0..255, no x / 255.0 before fit\n"
                  "    keras.layers.Rescaling(1.0 / 255)  # in the model: the one scaling")
    else:
        remedy = ("Standardise the features (fit on training data only):\n"
                  "    norm = keras.layers.Normalization()\n"
                  "    norm.adapt(x_train)\n"
                  "    model = keras.Sequential([keras.Input(x_train.shape[1:]), norm, ...])")
    return Finding(
        kind="unscaled_inputs",
        severity="warning",
        run=run.name,
        first_step=int(m.steps[0]),
        last_step=int(m.steps[-1]),
        layers=sorted({layer_names[j] for j in judged if layer_names[j]}) if twice else [],
        evidence={"tiny": True, "max_abs_input": largest,
                  "raw_max_abs_input": C.num(raw_largest),
                  "scaled_twice_by": twice,
                  "threshold": f"every judged feature's max |x| <= {TINY:g}"},
        explanation=explanation,
        remedy=remedy,
    )
