"""Detectors: pure functions from arrays to findings, one module per family.

`ALL_DETECTORS` lists callables ``detect(run: RunData) -> list[Finding]``;
each is a thin adapter that pulls arrays out of `RunData` and calls the pure
functions of its module. `PAIR_DETECTORS` lists callables
``detect(runs: dict[str, RunData]) -> list[Finding]`` for findings that need
two runs (Keras writes ``X/train`` and ``X/validation`` separately);
`detect_pairs` runs them all.

Each module's docstring documents its rule, threshold and severity.
"""

from __future__ import annotations

from typing import Callable

from tb_stability.detectors import (
    activations,
    adversarial,
    base_rate,
    config,
    data,
    generalization,
    gradients,
    missing_classes,
    nonfinite,
    spikes,
    trends,
    updates,
)
from tb_stability.findings import Finding
from tb_stability.rundata import RunData

Detector = Callable[[RunData], list]

ALL_DETECTORS: list[Detector] = [
    nonfinite.detect,
    gradients.detect_exploding,
    gradients.detect_vanishing,
    spikes.detect,
    trends.detect_divergence,
    trends.detect_stalled,
    adversarial.detect,
    base_rate.detect,
    trends.detect_oscillation,
    updates.detect,
    activations.detect_dead,
    activations.detect_saturated,
    data.detect_unscaled,
    data.detect_imbalance,
    missing_classes.detect,
    generalization.detect,
    config.detect,
]

PAIR_DETECTORS: list[Callable[[dict], list]] = [generalization.detect_pairs]


def detect_pairs(runs: dict[str, RunData]) -> list[Finding]:
    """Runs every pair detector over a logdir's runs."""
    out: list[Finding] = []
    for detector in PAIR_DETECTORS:
        out.extend(detector(runs))
    return out


__all__ = ["ALL_DETECTORS", "PAIR_DETECTORS", "detect_pairs", "Detector"]
