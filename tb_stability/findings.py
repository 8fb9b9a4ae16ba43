"""The findings vocabulary shared by detectors, CLI, plugin and live warnings."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

KINDS = (
    "nan_inf",
    "exploding_gradients",
    "vanishing_gradients",
    "loss_spike",
    "final_step_spike",
    "divergence",
    "oscillation",
    "stalled",
    "update_ratio_high",
    "update_ratio_low",
    "dead_units",
    "saturated_activations",
    "unscaled_inputs",
    "class_imbalance",
    "overfitting",
    "config_mismatch",
)
SEVERITIES = ("critical", "warning", "info")
_SEVERITY_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}


@dataclasses.dataclass
class Finding:
    """One diagnosis of one run.

    Attributes:
      kind: One of `KINDS`.
      severity: ``"critical"``, ``"warning"`` or ``"info"``.
      run: Run name (path relative to the logdir, ``"."`` for the root).
      first_step: First step at which the problem is visible.
      last_step: Last step at which it is visible.
      layers: Variable or layer names involved (may be empty).
      evidence: The numbers that triggered it, including the threshold.
      explanation: One or two plain sentences.
      remedy: What to change, with a Keras 3 code snippet.
    """

    kind: str
    severity: str
    run: str
    first_step: int | None
    last_step: int | None
    layers: list[str] = dataclasses.field(default_factory=list)
    evidence: dict[str, Any] = dataclasses.field(default_factory=dict)
    explanation: str = ""
    remedy: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown finding kind {self.kind!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (non-finite numbers become strings)."""
        data = dataclasses.asdict(self)
        data["evidence"] = _json_safe(data["evidence"])
        return data


def severity_rank(severity: str) -> int:
    """0 for critical, 1 for warning, 2 for info (lower is worse)."""
    return _SEVERITY_RANK[severity]


def sort_findings(findings: list[Finding]) -> list[Finding]:
    """Sorts by severity (worst first), then first step, then kind."""
    return sorted(
        findings,
        key=lambda f: (
            severity_rank(f.severity),
            f.first_step if f.first_step is not None else -1,
            f.kind,
        ),
    )


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value
