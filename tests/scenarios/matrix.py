"""Runs scenarios and scores the diagnoses: shared by the test and the benchmark."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from tb_stability.analysis import analyze_logdir
from tb_stability.reader import load_logdir
from tb_stability.findings import Finding
from tests.scenarios.registry import Scenario, run_scenario


@dataclasses.dataclass
class Outcome:
    """Diagnosis of one scenario and its fixed twin."""

    scenario: Scenario
    broken: list[Finding]
    fixed: list[Finding]
    train_seconds: float
    first_nonfinite_step: int | None = None

    @property
    def hit(self) -> Finding | None:
        """The first finding on the broken run whose kind is an expected kind."""
        for kind in self.scenario.kinds:
            for finding in self.broken:
                if finding.kind == kind:
                    return finding
        return None

    @property
    def fixed_critical(self) -> list[Finding]:
        """Critical findings on the fixed twin (false alarms)."""
        return [f for f in self.fixed if f.severity == "critical"]

    @property
    def fixed_same_kind(self) -> list[Finding]:
        """Findings on the fixed twin of the kind the broken run should get."""
        return [f for f in self.fixed if f.kind in self.scenario.kinds]

    @property
    def delay(self) -> int | None:
        """Steps from the known onset to the first flag, when the onset is known."""
        hit = self.hit
        onset = self.scenario.onset_step
        if onset == "first_nonfinite":
            onset = self.first_nonfinite_step
        if hit is None or onset is None or hit.first_step is None:
            return None
        return hit.first_step - onset


def findings_of(logdir: str) -> list[Finding]:
    """All findings of the single run in ``logdir``."""
    report = analyze_logdir(logdir)
    return [finding for run in report.runs for finding in run.findings]


def evaluate(scenario: Scenario, workdir: str) -> Outcome:
    """Trains the broken and the fixed program and analyses both."""
    started = time.monotonic()
    broken_dir = os.path.join(workdir, scenario.name)
    fixed_dir = os.path.join(workdir, scenario.name + "_fixed")
    run_scenario(scenario, broken_dir, fixed=False)
    run_scenario(scenario, fixed_dir, fixed=True)
    seconds = time.monotonic() - started
    return Outcome(scenario, findings_of(broken_dir), findings_of(fixed_dir), seconds,
                   first_nonfinite_loss(broken_dir))


def first_nonfinite_loss(logdir: str) -> int | None:
    """Ground truth for NaN scenarios: the first step whose raw loss is non-finite."""
    for run in load_logdir(logdir).runs.values():
        loss = run.steps.get("loss")
        if loss is not None:
            bad = np.flatnonzero(~np.isfinite(loss.values))
            if bad.size:
                return int(loss.steps[bad[0]])
    return None
