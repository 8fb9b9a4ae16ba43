"""Runs the detectors over runs and builds the report (one engine, three faces).

The CLI and the TensorBoard plugin both call `analyze_logdir`, so the
panel's findings equal ``tb-stability report`` on the same logdir.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

from tb_stability import consequences, schema
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
    return sort_findings(consequences.mark_all(findings))


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
        else:
            run_warnings.extend(_no_loss(run))
        findings = analyze_run(run, detectors, run_warnings)
        findings = sort_findings(findings + [f for f in pair_findings if f.run == name])
        report.runs.append(RunReport(run=name, findings=findings, warnings=run_warnings,
                                     instrumented=run.instrumented, checked=checked))
    _fold_companions(report)
    return report


COMPANION_RUNS = ("train", "validation")


def _fold_companions(report: Report) -> None:
    """Keeps a finding once where Keras' TensorBoard callback shares the instrumented logdir.

    ``TensorBoard(log_dir)`` beside ``StabilityCallback(log_dir)`` writes the
    runs ``X/train`` and ``X/validation`` beside the instrumented run ``X``
    (``train`` and ``validation`` beside ``.``). Their epoch scalars repeat
    what the instrumented run holds at every step, so a finding of a kind the
    instrumented run already has is reported there only, and the companion run
    says so.
    """
    by_name = {r.run: r for r in report.runs}
    for run_report in report.runs:
        head, _, tail = run_report.run.rpartition("/")
        parent = by_name.get(head or ".")
        if (tail not in COMPANION_RUNS or run_report.instrumented or parent is None
                or not parent.instrumented):
            continue
        kinds = {f.kind for f in parent.findings}
        repeated = [f for f in run_report.findings if f.kind in kinds]
        if not repeated:
            continue
        run_report.findings = [f for f in run_report.findings if f.kind not in kinds]
        names = ", ".join(sorted({f.kind for f in repeated}))
        run_report.warnings.append(
            f"Keras' TensorBoard callback wrote this run beside the instrumented run "
            f"'{parent.run}': {len(repeated)} finding(s) ({names}) are reported there, from "
            f"its per-step data, and not repeated here")


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


def _no_loss(run: RunData) -> list[str]:
    """Why the loss-curve rules read nothing in a run with scalars but no loss."""
    if run.held_out or not run.scalars:
        return []
    try:
        from tb_stability.detectors import _common, _loss_tags
    except Exception:  # noqa: BLE001 - the report says so (`_default_detectors`)
        return []
    if _common.loss_series(run)[0] is not None:
        return []
    pair = _loss_tags.adversarial_losses(run)
    if pair is not None:
        return [f"a GAN's losses ({pair[0]}, {pair[1]}): the generator and the discriminator "
                "trade off by design, so neither is read as a loss that should fall (no "
                "stall, divergence or spike rules); a discriminator that wins outright and "
                "non-finite values are still checked"]
    if run.instrumented or _common.val_loss_series(run)[0] is not None:
        return []
    tags = sorted(run.scalars)
    listed = ", ".join(tags[:5]) + (", ..." if len(tags) > 5 else "")
    return [f"no loss among this run's scalars ({listed}): the loss rules (spikes, divergence, "
            "stalls, overfitting) had nothing to read; log the training loss under a tag with "
            "'loss' in its name"]


def _not_recorded(run: RunData) -> list[str]:
    """Why an instrumented training recorded no statistics (from its run_info), if it says."""
    if run.instrumented:
        return []
    for _, info in reversed(run.json.get(schema.TAG_RUN_INFO) or []):
        if isinstance(info, dict) and isinstance(info.get("not_recorded"), str):
            return [f"the instrumentation recorded no statistics: {info['not_recorded']}"]
    return []
