"""Renders a `Report` as plain text or Markdown (JSON is `analysis.report_to_json`).

Run names and all other strings come from the logdir and may be hostile:
text output strips control characters (no terminal escape injection) and
Markdown output escapes HTML and Markdown syntax.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from tb_stability.analysis import Report, RunReport
from tb_stability.findings import Finding

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")

VERDICTS = {
    None: "healthy: no findings",
    "info": "healthy (notes only)",
    "warning": "needs attention",
    "critical": "UNHEALTHY",
}


def clean(text: Any) -> str:
    """Strips control characters (keeps newlines and tabs)."""
    return _CONTROL.sub("?", str(text))


def md_escape(text: Any) -> str:
    """Escapes a string for inline Markdown (HTML special characters included)."""
    text = clean(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _MD_SPECIAL.sub(r"\\\1", text)
    return text.replace("\n", " ")


def format_value(value: Any) -> str:
    """Formats an evidence value compactly (4 significant digits for floats)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        shown = ", ".join(format_value(v) for v in list(value)[:8])
        return f"[{shown}{', ...' if len(value) > 8 else ''}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def run_title(report: Report, run_report: RunReport) -> str:
    """The run's name, with the logdir's own directory name for the run at its root
    (``.``, as TensorBoard names it: ``tb-stability report .`` inside a run)."""
    if run_report.run != ".":
        return run_report.run
    name = os.path.basename(os.path.normpath(os.path.abspath(report.logdir)))
    return f". ({name})" if name else "."


def format_steps(finding: Finding) -> str:
    """``"step 12"``, ``"steps 12-40"`` or ``"-"``."""
    first, last = finding.first_step, finding.last_step
    if first is None and last is None:
        return "-"
    if first is None or last is None or first == last:
        return f"step {first if first is not None else last}"
    return f"steps {first}-{last}"


def verdict(run_report: RunReport) -> str:
    """A one-phrase health verdict for a run."""
    text = VERDICTS[run_report.worst_severity]
    if run_report.worst_severity is None and not run_report.checked:
        return "nothing to check"
    if run_report.worst_severity is None and not run_report.instrumented:
        text += " (not instrumented: only ordinary scalars were checked)"
    return text


def _evidence_items(finding: Finding) -> list[str]:
    return [f"{k}={format_value(v)}" for k, v in finding.evidence.items()]


def render_text(report: Report) -> str:
    """Renders a report as plain text, one block per run."""
    lines: list[str] = []
    for run_report in report.runs:
        counts = _counts(run_report)
        lines.append(f"== run {clean(run_title(report, run_report))}: "
                     f"{verdict(run_report)}{counts}")
        for finding in run_report.findings:
            lines.append(
                f"  [{finding.severity.upper()}] {finding.kind} ({format_steps(finding)})"
            )
            if finding.layers:
                lines.append(f"    layers:      {clean(', '.join(map(str, finding.layers)))}")
            if finding.evidence:
                lines.append(f"    evidence:    {clean('; '.join(_evidence_items(finding)))}")
            if finding.explanation:
                lines.append(f"    explanation: {clean(finding.explanation)}")
            if finding.remedy:
                remedy = clean(finding.remedy).splitlines() or [""]
                lines.append(f"    remedy:      {remedy[0]}")
                lines.extend(f"                 {line}" for line in remedy[1:])
        lines.append("")
    critical = sum(1 for r in report.runs for f in r.findings if f.severity == "critical")
    lines.append(
        f"{len(report.runs)} run(s), {critical} critical finding(s)"
    )
    return "\n".join(lines) + "\n"


def render_warnings_text(report: Report) -> str:
    """All reader and detector warnings, one per line (empty string if none)."""
    lines = [f"warning: {clean(w)}" for w in report.warnings]
    for run_report in report.runs:
        lines.extend(f"warning: run {clean(run_report.run)}: {clean(w)}"
                     for w in run_report.warnings)
    return "".join(line + "\n" for line in lines)


def _counts(run_report: RunReport) -> str:
    if not run_report.findings:
        return ""
    parts = {}
    for finding in run_report.findings:
        parts[finding.severity] = parts.get(finding.severity, 0) + 1
    return " (" + ", ".join(f"{n} {s}" for s, n in parts.items()) + ")"


def render_markdown(report: Report) -> str:
    """Renders a report as Markdown (safe to embed: HTML is escaped)."""
    lines = [f"# tb-stability report: {md_escape(report.logdir)}", ""]
    for run_report in report.runs:
        lines.append(f"## Run {md_escape(run_title(report, run_report))}: "
                     f"{md_escape(verdict(run_report))}")
        lines.append("")
        if not run_report.findings:
            lines.append("No findings.")
            lines.append("")
        for finding in run_report.findings:
            lines.append(f"### {finding.severity.upper()}: {md_escape(finding.kind)} "
                         f"({format_steps(finding)})")
            lines.append("")
            if finding.layers:
                lines.append("- **Layers:** " + ", ".join(md_escape(l) for l in finding.layers))
            if finding.evidence:
                lines.append("- **Evidence:** " + "; ".join(
                    md_escape(item) for item in _evidence_items(finding)))
            if finding.explanation:
                lines.append(f"- **Explanation:** {md_escape(finding.explanation)}")
            if finding.remedy:
                lines.append("- **Remedy:**")
                lines.append("")
                fence = "````" if "```" in finding.remedy else "```"
                lines.append(f"  {fence}")
                lines.extend(f"  {clean(line)}" for line in finding.remedy.splitlines())
                lines.append(f"  {fence}")
            lines.append("")
        if run_report.warnings:
            lines.append("Warnings:")
            lines.append("")
            lines.extend(f"- {md_escape(w)}" for w in run_report.warnings)
            lines.append("")
    if report.warnings:
        lines.append("## Warnings")
        lines.append("")
        lines.extend(f"- {md_escape(w)}" for w in report.warnings)
        lines.append("")
    return "\n".join(lines)
