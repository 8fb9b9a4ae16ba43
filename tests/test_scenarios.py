"""The scenario matrix: every seed-article failure is diagnosed, every fix is clean."""

import pytest

pytest.importorskip("tensorflow")

from tests.scenarios.matrix import evaluate  # noqa: E402
from tests.scenarios.registry import HEALTHY, SCENARIOS, run_scenario  # noqa: E402
from tests.scenarios.matrix import findings_of  # noqa: E402


# Seed 002's claim that a sigmoid LSTM saturates does not reproduce at this scale: the
# probes measure 0% saturated units and gradients do not vanish (see README, detection table).
PENDING = {"sigmoid_lstm"}


@pytest.mark.parametrize(
    "scenario",
    [pytest.param(s, marks=pytest.mark.xfail(reason="article claim does not reproduce", strict=False))
     if s.name in PENDING else s for s in SCENARIOS],
    ids=[s.name for s in SCENARIOS],
)
def test_scenario_is_flagged_and_fixed_twin_is_clean(scenario, tmp_path):
    outcome = evaluate(scenario, str(tmp_path))
    kinds = sorted({f.kind for f in outcome.broken})
    assert outcome.hit is not None, f"{scenario.name}: expected one of {scenario.kinds}, got {kinds}"
    assert not outcome.fixed_critical, (
        f"{scenario.name}_fixed has critical findings: "
        f"{[(f.kind, f.evidence) for f in outcome.fixed_critical]}"
    )


def test_healthy_baseline_has_no_critical_or_warning(tmp_path):
    run_scenario(HEALTHY, str(tmp_path / "healthy"), fixed=False)
    findings = findings_of(str(tmp_path / "healthy"))
    assert [f for f in findings if f.severity in ("critical", "warning")] == []
