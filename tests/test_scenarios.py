"""The scenario matrix: every seed-article failure is diagnosed, every fix is clean."""

import pytest

pytest.importorskip("tensorflow")

from tests.scenarios.matrix import evaluate, findings_of  # noqa: E402
from tests.scenarios.registry import EVERY, HEALTHY, SCENARIOS, run_scenario  # noqa: E402


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario_is_flagged_and_fixed_twin_is_clean(scenario, tmp_path):
    outcome = evaluate(scenario, str(tmp_path))
    kinds = sorted({f.kind for f in outcome.broken})
    assert outcome.hit is not None, f"{scenario.name}: expected one of {scenario.kinds}, got {kinds}"
    assert scenario.remedy_says in outcome.hit.remedy, (scenario.name, outcome.hit.remedy)
    if outcome.delay is not None:  # onset known: flagged at it, or within two log intervals
        assert 0 <= outcome.delay <= 2 * EVERY, (scenario.name, outcome.delay)
    assert not outcome.fixed_critical, (
        f"{scenario.name}_fixed has critical findings: "
        f"{[(f.kind, f.evidence) for f in outcome.fixed_critical]}"
    )


def test_healthy_baseline_has_no_critical_or_warning(tmp_path):
    run_scenario(HEALTHY, str(tmp_path / "healthy"), fixed=False)
    findings = findings_of(str(tmp_path / "healthy"))
    assert [f for f in findings if f.severity in ("critical", "warning")] == []
