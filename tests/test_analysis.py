"""analysis.py: running detectors, isolating failures, the JSON report."""

from __future__ import annotations

import json
import sys
import types

import pytest

from tb_stability import analysis
from tb_stability.findings import Finding
from tb_stability.reader import LogdirError
from tests.test_reader import HOSTILE, write_instrumented_run


def critical_loss_detector(run):
    """Critical nan_inf on runs whose final loss exceeds 0.9 (all instrumented runs)."""
    loss = run.steps.get("loss")
    if loss is None or loss.values[-1] <= 0.9:
        return []
    return [Finding(kind="nan_inf", severity="critical", run=run.name,
                    first_step=int(loss.steps[-1]), last_step=int(loss.steps[-1]),
                    layers=["dense/kernel"], evidence={"loss": float("inf"), "threshold": 0.9},
                    explanation="Loss became too large.", remedy="optimizer = SGD(clipnorm=1.0)")]


def info_detector(run):
    return [Finding(kind="stalled", severity="info", run="", first_step=0, last_step=1)]


def broken_detector(run):
    raise RuntimeError("boom")


def junk_detector(run):
    return ["not a finding"]


@pytest.fixture
def logdir(tmp_path):
    write_instrumented_run(tmp_path / "b_run")
    write_instrumented_run(tmp_path / "a_run" / HOSTILE)
    return tmp_path


def test_failing_detectors_become_warnings_and_others_still_run(logdir):
    detectors = [broken_detector, junk_detector, info_detector, critical_loss_detector]
    report = analysis.analyze_logdir(logdir, detectors=detectors)
    assert [r.run for r in report.runs] == [f"a_run/{HOSTILE}", "b_run"]
    for run_report in report.runs:
        assert [f.kind for f in run_report.findings] == ["nan_inf", "stalled"]
        assert run_report.findings[1].run == run_report.run  # filled in when empty
        assert run_report.worst_severity == "critical"
        broken, junk = run_report.warnings
        assert "broken_detector failed: RuntimeError: boom" in broken
        assert "junk_detector" in junk and "not a Finding" in junk
    assert report.has_critical


def test_report_to_json_shape(logdir):
    report = analysis.analyze_logdir(logdir, detectors=[info_detector, critical_loss_detector])
    data = analysis.report_to_json(report)
    assert json.loads(json.dumps(data)) == data  # strictly JSON (inf became a string)
    assert set(data) == {"version", "runs", "warnings"} and data["version"] == 1
    assert [r["run"] for r in data["runs"]] == [f"a_run/{HOSTILE}", "b_run"]
    first = data["runs"][0]
    assert set(first) == {"run", "findings", "warnings"}
    assert first["findings"][0]["evidence"] == {"loss": "inf", "threshold": 0.9}
    assert first["findings"][0]["kind"] == "nan_inf"
    assert first["findings"][1]["severity"] == "info"


def test_run_filter_and_no_findings(logdir):
    report = analysis.analyze_logdir(logdir, run_filter="b_", detectors=[info_detector])
    assert [r.run for r in report.runs] == ["b_run"]
    assert not report.has_critical
    empty = analysis.analyze_logdir(logdir, detectors=[])
    assert all(r.findings == [] and r.worst_severity is None for r in empty.runs)


def test_default_detectors_come_from_the_detectors_package(logdir, monkeypatch):
    fake = types.ModuleType("tb_stability.detectors")
    fake.ALL_DETECTORS = [critical_loss_detector]
    import tb_stability

    monkeypatch.setitem(sys.modules, "tb_stability.detectors", fake)
    monkeypatch.setattr(tb_stability, "detectors", fake, raising=False)
    report = analysis.analyze_logdir(logdir)
    assert all(r.findings[0].kind == "nan_inf" for r in report.runs)


class _BrokenDetectorsFinder:
    """Makes `import tb_stability.detectors` fail inside the package (a bug in it)."""

    def find_spec(self, name, path=None, target=None):
        import importlib.machinery

        if name != "tb_stability.detectors":
            return None
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ImportError("cannot import name 'detect_spikes'")


def test_broken_detectors_package_is_a_report_warning(logdir, monkeypatch):
    import tb_stability

    monkeypatch.delitem(sys.modules, "tb_stability.detectors", raising=False)
    monkeypatch.delattr(tb_stability, "detectors", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenDetectorsFinder()] + sys.meta_path)
    report = analysis.analyze_logdir(logdir)
    assert any("detectors could not be imported" in w and "detect_spikes" in w
               for w in report.warnings)
    assert all(r.findings == [] for r in report.runs)


def test_absent_detectors_package_means_no_findings(logdir, monkeypatch):
    import tb_stability

    monkeypatch.setitem(sys.modules, "tb_stability.detectors", None)
    monkeypatch.delattr(tb_stability, "detectors", raising=False)
    report = analysis.analyze_logdir(logdir)
    assert report.warnings == [] and all(r.findings == [] for r in report.runs)


def test_analyze_run_defaults_warnings_to_the_run(logdir):
    from tb_stability.reader import load_run

    run = load_run(logdir / "b_run")
    findings = analysis.analyze_run(run, [broken_detector, info_detector])
    assert [f.kind for f in findings] == ["stalled"]
    assert "broken_detector" in run.warnings[0]


def test_missing_logdir_raises(tmp_path):
    with pytest.raises(LogdirError):
        analysis.analyze_logdir(tmp_path / "nope", detectors=[])


def test_findings_after_the_first_nan_are_downgraded_to_consequences():
    from tb_stability.consequences import mark_consequences_of_nan
    from tb_stability.findings import Finding

    findings = [
        Finding("nan_inf", "critical", "r", 28, 95),
        Finding("dead_units", "critical", "r", 30, 95, ["dense"]),
        Finding("exploding_gradients", "critical", "r", 6, 14),
        Finding("class_imbalance", "warning", "r", 50, 95),
    ]
    out = {f.kind: f for f in mark_consequences_of_nan(findings)}
    assert out["nan_inf"].severity == "critical"
    assert out["exploding_gradients"].severity == "critical"  # before the NaN: a cause
    for kind in ("dead_units", "class_imbalance"):
        assert out[kind].severity == "info"
        assert out[kind].evidence["after_nan_step"] == 28
        assert out[kind].explanation.startswith("After the first non-finite value (step 28)")


def test_without_a_nan_nothing_is_downgraded():
    from tb_stability.consequences import mark_consequences_of_nan
    from tb_stability.findings import Finding

    findings = [Finding("dead_units", "critical", "r", 30, 95, ["dense"])]
    assert mark_consequences_of_nan(findings)[0].severity == "critical"


def _blowup(outcome, severity="critical", onset=1):
    from tb_stability.findings import Finding

    return Finding("divergence", severity, "r", onset, 95, evidence={"early_blowup": outcome},
                   remedy="Retrain from a fresh initialisation with the learning rate 100x lower")


@pytest.mark.parametrize("blowup, demoted", [
    (_blowup("stuck"), True), (_blowup("diverged"), True),
    (_blowup("recovered", "warning"), False),  # it came back: what follows is its own story
    (_blowup("stuck", onset=60), False),  # the findings begin before the blow-up
], ids=["stuck", "diverged", "recovered", "findings-before-the-blowup"])
def test_what_an_unrecovered_blowup_explains_is_its_consequence(blowup, demoted):
    from tb_stability.consequences import mark_consequences_of_blowup
    from tb_stability.findings import Finding

    findings = [
        blowup,
        Finding("dead_units", "critical", "r", 5, 95, ["dense"], remedy="He initialisation"),
        Finding("vanishing_gradients", "warning", "r", 10, 95, ["embedding"]),
        Finding("class_imbalance", "warning", "r", 50, 95, evidence={"prediction_share": 0.99}),
        Finding("class_imbalance", "warning", "r", 10, 95, evidence={"majority_share": 0.97}),
        Finding("saturated_activations", "warning", "r", 10, 95, ["dense"],
                evidence={"saturated_at_first_step": {"dense": 0.8}}),
        Finding("update_ratio_high", "warning", "r", 0, 95, ["dense/kernel"]),
    ]
    out = mark_consequences_of_blowup(findings)
    got = [(f.kind, f.severity) for f in out]
    expected = [(blowup.kind, blowup.severity),
                ("dead_units", "info" if demoted else "critical"),
                ("vanishing_gradients", "info" if demoted else "warning"),
                ("class_imbalance", "info" if demoted else "warning"),  # the predictions' collapse
                ("class_imbalance", "warning"),  # the labels' own imbalance: a cause
                ("saturated_activations", "warning"),  # saturated before any update: a cause
                ("update_ratio_high", "warning")]  # the learning rate: the blow-up's own cause
    assert got == expected
    if demoted:
        dead = out[1]
        assert dead.evidence["consequence_of"] == "divergence" and dead.evidence["blowup_step"] == 1
        assert dead.explanation.startswith("After the loss blew up at step 1 and never recovered")
        assert dead.remedy == f"Fix the blow-up first:\n{blowup.remedy}"


def _dead_and_vanishing_run(dead_fraction, grad_scale):
    """A run whose probes report ``dead_fraction`` per layer and whose gradients vanish."""
    import numpy as np

    from tb_stability.rundata import Matrix
    from tests import detectors_support as S

    n = 400
    grads = S.per_variable(n, scale=grad_scale)
    steps = np.arange(0, n, 10)
    dead = Matrix(steps=steps, names=("dense", "dense_1", "dense_2"),
                  values=np.tile(np.asarray(dead_fraction, float), (steps.size, 1)))
    return S.make_run(S.healthy_loss(n), S.healthy_grad(n), variables={"grad_norm": grads},
                      layers={"dead_fraction": dead})


@pytest.mark.parametrize("dead_fraction, grad_scale, consequence", [
    ([1.0, 0.0, 0.0], [1e-7, 1e-8, 0.4, 0.05, 0.6, 0.1], True),
    ([0.0, 1.0, 0.0], [1e-7, 1e-8, 1e-6, 1e-7, 0.6, 0.1], True),
    ([0.8, 0.0, 0.0], [1e-7, 1e-8, 0.4, 0.05, 0.6, 0.1], False),
    ([1.0, 0.0, 0.0], [1e-7, 1e-8, 1e-6, 1e-7, 0.6, 0.1], False),
], ids=["dead-layer-itself", "dead-layer-after-the-flagged-ones", "mostly-dead-only",
        "flagged-beyond-the-dead-layer"])
def test_vanishing_gradients_through_a_dead_layer_are_its_consequence(
        dead_fraction, grad_scale, consequence):
    found = {f.kind: f for f in analysis.analyze_run(_dead_and_vanishing_run(dead_fraction,
                                                                              grad_scale))}
    vanishing = found["vanishing_gradients"]
    assert found["dead_units"].severity == ("critical" if max(dead_fraction) >= 0.99
                                            else "warning")
    if consequence:
        assert vanishing.severity == "info"
        assert vanishing.evidence["consequence_of"] == "dead_units"
        assert vanishing.evidence["dead_layers"] == [
            name for name, value in zip(("dense", "dense_1", "dense_2"), dead_fraction)
            if value >= 0.99]
        assert vanishing.remedy.startswith("Fix the dead units in")
        assert found["dead_units"].remedy in vanishing.remedy
    else:
        assert vanishing.severity == "warning"
        assert "consequence_of" not in vanishing.evidence


@pytest.mark.parametrize("dead, severity", [(1.0, "info"), (0.8, "warning")],
                         ids=["all-dead", "mostly-dead"])
def test_a_stall_behind_a_dead_layer_is_its_consequence(dead, severity):
    import numpy as np

    from tb_stability.rundata import Matrix
    from tests import detectors_support as S

    rng = np.random.default_rng(0)
    loss = 0.69 + rng.normal(0, 0.01, 400)
    updates = S.per_variable(400, scale=[1e-8] * 6)
    steps = np.arange(0, 400, 10)
    fractions = Matrix(steps=steps, names=("dense", "dense_1"),
                       values=np.tile([dead, 0.0], (steps.size, 1)))
    run = S.make_run(loss, lr=1.0, variables={"update_ratio": updates},
                     layers={"dead_fraction": fractions})
    found = {f.kind: f for f in analysis.analyze_run(run)}
    assert found["stalled"].severity == severity
    assert "raise the learning rate" not in found["stalled"].remedy.lower()
    if severity == "info":
        assert found["stalled"].evidence["dead_layers"] == ["dense"]
        assert found["stalled"].remedy.startswith("Fix the dead units in dense first:")
