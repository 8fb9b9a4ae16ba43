"""Runs the detectors over runs and builds the report (one engine, three faces).

The CLI and the TensorBoard plugin both call `analyze_logdir`, so the
panel's findings equal ``tb-stability report`` on the same logdir.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

from tb_stability import schema
from tb_stability.findings import Finding, severity_rank, sort_findings
from tb_stability.reader import load_logdir
from tb_stability.rundata import RunData

REPORT_VERSION = 1

Detector = Callable[[RunData], list]


@dataclasses.dataclass
class RunReport:
    """Findings and warnings for one run.

    Attributes:
      run: Run name.
      findings: Sorted findings (worst first).
      warnings: Reader and detector warnings for this run.
      instrumented: Whether the run holds tb-stability instrumentation data.
      checked: False when the run holds nothing the detectors read (no scalar,
        no stability data: images, text, histograms or hparams only).
    """

    run: str
    findings: list[Finding] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    instrumented: bool = False
    checked: bool = True

    @property
    def worst_severity(self) -> str | None:
        """``"critical"``, ``"warning"``, ``"info"`` or None without findings."""
        if not self.findings:
            return None
        return min((f.severity for f in self.findings), key=severity_rank)


@dataclasses.dataclass
class Report:
    """The report for a logdir: runs sorted by name, plus logdir-level warnings."""

    logdir: str
    runs: list[RunReport] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def has_critical(self) -> bool:
        """True when any run has a critical finding (the CLI exits 1)."""
        return any(f.severity == "critical" for r in self.runs for f in r.findings)


def _default_detectors(warnings: list[str] | None = None) -> list[Detector]:
    """`tb_stability.detectors.ALL_DETECTORS`, or [] while the package is absent."""
    try:
        from tb_stability import detectors
    except ModuleNotFoundError as error:
        if error.name in ("tb_stability.detectors",):
            return []
        if warnings is not None:
            warnings.append(f"detectors could not be imported: {error}")
        return []
    except Exception as error:  # a broken detector module must not kill the report
        if warnings is not None:
            warnings.append(f"detectors could not be imported: {type(error).__name__}: {error}")
        return []
    return list(getattr(detectors, "ALL_DETECTORS", []))


def _pair_findings(runs: dict[str, RunData], warnings: list[str]) -> list[Finding]:
    """Findings that need two runs (Keras' ``X/train`` + ``X/validation``)."""
    try:
        from tb_stability.detectors import PAIR_DETECTORS
    except Exception:  # reported by _default_detectors already
        return []
    findings: list[Finding] = []
    for detector in PAIR_DETECTORS:
        try:
            findings.extend(f for f in detector(runs) or [] if isinstance(f, Finding))
        except Exception as error:
            warnings.append(
                f"detector {detector_name(detector)} failed: {type(error).__name__}: {error}"
            )
    return findings


def detector_name(detector: Callable) -> str:
    """A readable name for a detector (``module.function``)."""
    module = getattr(detector, "__module__", "") or ""
    name = getattr(detector, "__qualname__", None) or getattr(detector, "__name__", None)
    if name is None:
        name = type(detector).__name__
    return f"{module}.{name}" if module else name


def analyze_run(
    run: RunData,
    detectors: Sequence[Detector] | None = None,
    warnings: list[str] | None = None,
) -> list[Finding]:
    """Runs every detector on one run.

    A detector that raises, or returns something that is not a list of
    `Finding`, does not stop the others: a warning naming it is added.

    Args:
      run: The run's data.
      detectors: Detectors to run; defaults to
        `tb_stability.detectors.ALL_DETECTORS`.
      warnings: Where detector warnings go; defaults to ``run.warnings``.

    Returns:
      The findings, sorted with `findings.sort_findings`.
    """
    sink = run.warnings if warnings is None else warnings
    if detectors is None:
        detectors = _default_detectors(sink)
    findings: list[Finding] = []
    for detector in detectors:
        try:
            result = detector(run)
        except Exception as error:
            sink.append(
                f"detector {detector_name(detector)} failed: {type(error).__name__}: {error}"
            )
            continue
        for item in result or []:
            if not isinstance(item, Finding):
                sink.append(
                    f"detector {detector_name(detector)} returned a "
                    f"{type(item).__name__}, not a Finding; ignored"
                )
                continue
            if not item.run:
                item.run = run.name
            findings.append(item)
    findings = mark_consequences_of_dead_units(mark_consequences_of_nan(findings))
    return sort_findings(mark_consequences_of_bad_batch(findings))


def mark_consequences_of_nan(findings: list[Finding]) -> list[Finding]:
    """Downgrades findings that begin at or after the first NaN to ``info``.

    Once weights or activations are NaN every statistic is garbage (a NaN
    activation is never positive, so a ReLU layer reads as dead, predictions
    collapse to one class, ...). Those findings are consequences, not causes:
    they stay in the report, as ``info``, with ``evidence["after_nan_step"]``.
    """
    onsets = [f.first_step for f in findings
              if f.kind == "nan_inf" and f.severity == "critical" and f.first_step is not None]
    if not onsets:
        return findings
    onset = min(onsets)
    for finding in findings:
        if finding.kind == "nan_inf" or finding.first_step is None or finding.first_step < onset:
            continue
        if finding.severity != "info":
            finding.severity = "info"
            finding.evidence["after_nan_step"] = onset
            finding.explanation = (
                f"After the first non-finite value (step {onset}), so most likely a consequence "
                f"of it: {finding.explanation}"
            )
    return findings


def mark_consequences_of_dead_units(findings: list[Finding]) -> list[Finding]:
    """Downgrades what a layer of dead units explains to ``info``.

    A layer whose units never fire (``dead_units`` at >= 99 %) passes no
    signal forward and no gradient back: its own weights and every layer
    before it get none (which the vanishing-gradient rule flags) and the loss
    stops improving (which the stalled rule flags, with a "raise the learning
    rate" fix that would make it worse). The cure is the dead layer's, so those
    findings stay, as ``info`` with ``evidence["consequence_of"] =
    "dead_units"``, the dead layers named and the dead-units remedy first.
    Vanishing gradients only when every flagged layer is a dead one or comes
    before one (in that finding's model order); both only when their steps
    overlap the dead stretch.
    """
    from tb_stability.detectors.activations import ALL_DEAD

    dead_findings = [f for f in findings if f.kind == "dead_units" and f.severity != "info"]
    for finding in findings:
        if finding.kind not in ("vanishing_gradients", "stalled") or finding.severity == "info":
            continue
        for dead in dead_findings:
            fractions = dead.evidence.get("median_fraction_second_half") or {}
            names = [name for name, value in fractions.items()
                     if isinstance(value, (int, float)) and value >= ALL_DEAD]
            if names and _overlap(dead, finding) and (
                    finding.kind == "stalled" or _before_dead_layers(finding, names)):
                _mark_consequence(finding, dead, names)
                break
    return findings


def mark_consequences_of_bad_batch(findings: list[Finding]) -> list[Finding]:
    """Downgrades a stalled or diverging loss beside a bad batch that recurs every epoch.

    A batch that comes back at the same place every epoch with a loss far
    above the others' (``loss_spike`` naming its ``batch_in_epoch``: outliers
    or wrong labels in unshuffled data) throws the model back at every epoch,
    so the other batches' loss stops improving or rises: the stalled and
    divergence rules flag that, with learning-rate fixes that cure nothing.
    Those findings stay, as ``info`` with ``evidence["consequence_of"] =
    "loss_spike"`` and the bad batch's remedy first, where their steps overlap
    the spikes'. Critical ones (a loss that went 10x up or non-finite) stay.
    """
    bad = [f for f in findings if f.kind == "loss_spike" and f.severity == "warning"
           and f.evidence.get("batch_in_epoch")]
    for finding in findings:
        if finding.kind not in ("stalled", "divergence") or finding.severity != "warning":
            continue
        spike = next((b for b in bad if _overlap(b, finding)), None)
        if spike is None:
            continue
        position = f"batch {spike.evidence['batch_in_epoch']} of {spike.evidence['batches_per_epoch']}"
        finding.severity = "info"
        finding.evidence["consequence_of"] = "loss_spike"
        finding.evidence["bad_batch_in_epoch"] = spike.evidence["batch_in_epoch"]
        finding.explanation = (
            f"Most likely a consequence of the bad {position} in every epoch (its loss "
            f"{_spike_ratio(spike)} the others'; each of its updates throws the model back): "
            f"{finding.explanation}"
        )
        finding.remedy = f"Fix the bad batch first:\n{spike.remedy}"
    return findings


def _spike_ratio(spike: Finding) -> str:
    """How far a loss_spike finding's worst spike stood above its median, in words."""
    points = spike.evidence.get("spikes") or []
    ratios = [p.get("ratio_to_median") for p in points if isinstance(p, dict)]
    ratios = [r for r in ratios if isinstance(r, (int, float))]
    return f"reaching {max(ratios):.3g}x" if ratios else "far above"


def _before_dead_layers(vanishing: Finding, dead_names: list[str]) -> bool:
    order = list((vanishing.evidence.get("median_grad_norm_by_layer") or {}).keys())
    positions = [i for i, layer in enumerate(order)
                 if any(name in layer.split("/") for name in dead_names)]
    flagged = [order.index(layer) for layer in vanishing.layers if layer in order]
    return bool(positions and flagged) and max(flagged) <= max(positions)


def _mark_consequence(finding: Finding, dead: Finding, names: list[str]) -> None:
    listed = ", ".join(names[:4])
    finding.severity = "info"
    finding.evidence["consequence_of"] = "dead_units"
    finding.evidence["dead_layers"] = names
    finding.explanation = (
        f"A consequence of the dead units in {listed} (a layer whose units never fire passes "
        f"no signal forward and no gradient back): {finding.explanation}"
    )
    finding.remedy = f"Fix the dead units in {listed} first:\n{dead.remedy}"


def _overlap(a: Finding, b: Finding) -> bool:
    if None in (a.first_step, a.last_step, b.first_step, b.last_step):
        return True
    return a.first_step <= b.last_step and b.first_step <= a.last_step


def analyze_logdir(
    path: str | os.PathLike,
    run_filter: str | None = None,
    detectors: Sequence[Detector] | None = None,
) -> Report:
    """Loads a logdir and analyses every run.

    Args:
      path: The logdir.
      run_filter: Keep only runs whose name contains this substring.
      detectors: Detectors to run (defaults to ``ALL_DETECTORS``).

    Returns:
      A `Report` with runs sorted by name.

    Raises:
      tb_stability.reader.LogdirError: Missing logdir or no event files.
    """
    logdir = load_logdir(path)
    report = Report(logdir=os.fspath(path), warnings=list(logdir.warnings))
    pair_findings: list[Finding] = []
    if detectors is None:
        detectors = _default_detectors(report.warnings)
        pair_findings = _pair_findings(logdir.runs, report.warnings)
    for name in sorted(logdir.runs):
        if run_filter is not None and run_filter not in name:
            continue
        run = logdir.runs[name]
        run_warnings = list(run.warnings) + _not_recorded(run)
        checked = run.checkable
        if not checked:
            run_warnings.append(NOTHING_TO_CHECK)
        findings = analyze_run(run, detectors, run_warnings)
        findings = sort_findings(findings + [f for f in pair_findings if f.run == name])
        report.runs.append(RunReport(run=name, findings=findings, warnings=run_warnings,
                                     instrumented=run.instrumented, checked=checked))
    return report


def run_report_to_json(run_report: RunReport) -> dict[str, Any]:
    """One run's entry in `report_to_json`."""
    return {
        "run": run_report.run,
        "findings": [f.to_json() for f in sort_findings(run_report.findings)],
        "warnings": list(run_report.warnings),
    }


def report_to_json(report: Report) -> dict[str, Any]:
    """The JSON form of a report (what ``tb-stability report --format json`` prints).

    Returns:
      ``{"version": 1, "runs": [{"run", "findings", "warnings"}], "warnings": [...]}``
      with runs sorted by name and findings sorted worst first.
    """
    return {
        "version": REPORT_VERSION,
        "runs": [run_report_to_json(r) for r in sorted(report.runs, key=lambda r: r.run)],
        "warnings": list(report.warnings),
    }


NOTHING_TO_CHECK = ("no scalar and no stability data in this run (only images, text, "
                    "histograms or hparams): nothing was checked")


def _not_recorded(run: RunData) -> list[str]:
    """Why an instrumented training recorded no statistics (from its run_info), if it says."""
    if run.instrumented:
        return []
    for _, info in reversed(run.json.get(schema.TAG_RUN_INFO) or []):
        if isinstance(info, dict) and isinstance(info.get("not_recorded"), str):
            return [f"the instrumentation recorded no statistics: {info['not_recorded']}"]
    return []
