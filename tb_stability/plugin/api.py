"""Pure implementations of the plugin's data routes (see ``http_api.md``).

Each function takes a `Snapshot` plus the request's parameters and returns
``(body, mime)`` with ``body`` a JSON string. Bad parameters raise
`tensorboard.errors.InvalidArgumentError` (HTTP 400), unknown runs, tags and
quantities raise `tensorboard.errors.NotFoundError` (HTTP 404).
"""

from __future__ import annotations

import json
from typing import Any

from tensorboard import errors

from tb_stability import running_mean
from tb_stability.findings import SEVERITIES
from tb_stability.plugin import downsample
from tb_stability.plugin.data import Snapshot

JSON_MIME = "application/json"
# Upper bounds on what one response may hold.
MAX_SERIES_POINTS = downsample.DEFAULT_MAX_POINTS
MAX_MATRIX_STEPS = downsample.DEFAULT_MAX_STEPS
MAX_MATRIX_NAMES = downsample.DEFAULT_MAX_NAMES
MAX_JSON_RECORDS = 50
MAX_RUNS = 1000  # runs listed by /runs and /findings
MAX_FINDINGS_PER_RUN = 200
MAX_WARNINGS = 50  # per run, and logdir-level
MAX_TAGS = 500  # per run and kind in /runs
MAX_NAME_LEN = 1024  # longer tag/layer names are left out of listings
MAX_TEXT_LEN = 2000  # warnings and finding texts are cut beyond this
_MAX_PARAM_LEN = 4096


def _dumps(body: Any) -> str:
    return json.dumps(body, allow_nan=False, separators=(",", ":"))


def require(value: str | None, name: str) -> str:
    """Returns a required query parameter or raises InvalidArgumentError (400)."""
    if value is None or value == "":
        raise errors.InvalidArgumentError(f"missing required parameter {name!r}")
    if len(value) > _MAX_PARAM_LEN or "\0" in value:
        raise errors.InvalidArgumentError(f"invalid parameter {name!r}")
    return value


def _known_run(snapshot: Snapshot, run: str | None) -> str:
    run = require(run, "run")
    if run not in snapshot.run_names():
        raise errors.NotFoundError(f"unknown run {run!r}")
    return run


def _run_data(snapshot: Snapshot, run: str):
    data = snapshot.runs.get(run)
    if data is None:
        raise errors.NotFoundError(f"no data read for run {run!r}")
    return data


def _worst(findings: list[dict[str, Any]]) -> str | None:
    for severity in SEVERITIES:
        if any(f.get("severity") == severity for f in findings):
            return severity
    return None


def _cut(text: Any, limit: int = MAX_TEXT_LEN) -> tuple[str, bool]:
    text = str(text)
    if len(text) <= limit:
        return text, False
    return text[:limit] + "... [truncated]", True


def _names(names, limit: int = MAX_TAGS) -> tuple[list[str], bool]:
    """Sorted names without over-long ones, at most ``limit``; and whether any was left out."""
    names = sorted(names)
    kept = [n for n in names if len(n) <= MAX_NAME_LEN][:limit]
    return kept, len(kept) != len(names)


def _warnings(items) -> tuple[list[str], bool]:
    items = list(items or [])
    cut = [_cut(w) for w in items[:MAX_WARNINGS]]
    return [w for w, _ in cut], len(items) > MAX_WARNINGS or any(t for _, t in cut)


def bounded_report(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` with at most `MAX_RUNS` runs, `MAX_FINDINGS_PER_RUN` findings and
    `MAX_WARNINGS` warnings per run, and long texts cut.

    Returns ``report`` itself when nothing had to be cut (so ``/findings``
    equals ``tb-stability report --format json``); otherwise a copy with
    ``"truncated": true`` at the top and on each cut run (with
    ``"total_findings"``/``"total_warnings"``) and ``"total_runs"``.
    """
    truncated = False
    runs = []
    entries = list(report.get("runs", []))
    for entry in entries[:MAX_RUNS]:
        findings = list(entry.get("findings", []))
        warnings, cut_w = _warnings(entry.get("warnings", []))
        cut_f = len(findings) > MAX_FINDINGS_PER_RUN
        kept = []
        for finding in findings[:MAX_FINDINGS_PER_RUN]:
            finding = dict(finding)
            for key in ("explanation", "remedy"):
                if isinstance(finding.get(key), str):
                    finding[key], cut = _cut(finding[key])
                    cut_f = cut_f or cut
            layers = list(finding.get("layers") or [])
            if len(layers) > MAX_TAGS or any(len(str(l)) > MAX_NAME_LEN for l in layers):
                finding["layers"] = [_cut(l, MAX_NAME_LEN)[0] for l in layers[:MAX_TAGS]]
                cut_f = True
            kept.append(finding)
        if cut_f or cut_w:
            truncated = True
            entry = dict(entry, findings=kept, warnings=warnings, truncated=True,
                         total_findings=len(findings),
                         total_warnings=len(entry.get("warnings", [])))
        runs.append(entry)
    warnings, cut_w = _warnings(report.get("warnings", []))
    if not truncated and not cut_w and len(entries) <= MAX_RUNS:
        return report
    return dict(report, runs=runs, warnings=warnings, truncated=True, total_runs=len(entries))


def runs_impl(snapshot: Snapshot) -> tuple[str, str]:
    """Body of ``/runs``: every run with worst severity, counts and available data.

    At most `MAX_RUNS` runs (then ``"truncated": true`` and ``"total_runs"``);
    per run at most `MAX_TAGS` names of each kind, names longer than
    `MAX_NAME_LEN` left out (then the run has ``"truncated": true``).
    """
    runs = []
    all_names = snapshot.run_names()
    for name in all_names[:MAX_RUNS]:
        entry = snapshot.report_entry(name) or {"findings": [], "warnings": []}
        findings = entry.get("findings", [])
        data = snapshot.runs.get(name)
        item: dict[str, Any] = {
            "run": name,
            "worst_severity": _worst(findings),
            "counts": {s: sum(f.get("severity") == s for f in findings) for s in SEVERITIES},
            "kinds": sorted({f.get("kind") for f in findings if f.get("kind")}),
            "warnings": len(entry.get("warnings", [])),
            "instrumented": bool(data is not None and data.instrumented),
            "checked": bool(data is not None and data.checkable),
            "series": {"steps": [], "scalars": [], "per_batch": []},
            "matrices": {"variables": [], "layers": []},
            "has_nan_origin": False,
            "loss": None,
            "adversarial": None,
        }
        if data is not None:
            cut = False
            for group, kinds in (("series", ("steps", "scalars")),
                                 ("matrices", ("variables", "layers"))):
                for kind in kinds:
                    item[group][kind], cut_here = _names(getattr(data, kind))
                    cut = cut or cut_here
            item["series"]["per_batch"] = running_mean.recoverable_tags(data)
            item["loss"] = _loss_choice(data)
            item["adversarial"] = _adversarial_choice(data)
            item["has_nan_origin"] = bool(data.json.get("stability/nan_origin"))
            if cut:
                item["truncated"] = True
        runs.append(item)
    warnings, cut_w = _warnings(snapshot.report.get("warnings", []))
    body: dict[str, Any] = {"runs": runs, "warnings": warnings}
    if len(all_names) > MAX_RUNS or cut_w:
        body.update(truncated=True, total_runs=len(all_names))
    return _dumps(body), JSON_MIME


def _loss_choice(data) -> dict[str, str] | None:
    """The training loss the detectors read (`_common.loss_choice`), for the panel to chart.

    None when the run has none, or when the detectors cannot be imported (the
    report says why; the panel then picks a loss tag itself).
    """
    try:
        from tb_stability.detectors._common import loss_choice  # pylint: disable=import-outside-toplevel
        choice = loss_choice(data)
    except Exception:  # pylint: disable=broad-except
        return None
    if choice is None or len(choice[1]) > MAX_NAME_LEN:
        return None
    return {"source": choice[0], "tag": choice[1]}


def _adversarial_choice(data) -> dict[str, str] | None:
    """A GAN's two loss tags (`_loss_tags.adversarial_losses`), for the panel to chart both.

    None for any other run, or when the detectors cannot be imported.
    """
    try:
        from tb_stability.detectors._loss_tags import adversarial_losses  # pylint: disable=import-outside-toplevel
        pair = adversarial_losses(data)
    except Exception:  # pylint: disable=broad-except
        return None
    if pair is None or max(len(tag) for tag in pair) > MAX_NAME_LEN:
        return None
    return {"generator": pair[0], "discriminator": pair[1]}


def findings_impl(snapshot: Snapshot, run: str | None = None) -> tuple[str, str]:
    """Body of ``/findings``: ``report_to_json`` of the logdir, optionally one run."""
    if run is None:
        return _dumps(bounded_report(snapshot.report)), JSON_MIME
    run = _known_run(snapshot, run)
    entry = snapshot.report_entry(run) or {"run": run, "findings": [], "warnings": []}
    body = dict(snapshot.report)
    body["runs"] = [entry]
    return _dumps(bounded_report(body)), JSON_MIME


def series_impl(
    snapshot: Snapshot,
    run: str | None,
    tag: str | None,
    source: str | None = None,
    max_points: int = MAX_SERIES_POINTS,
) -> tuple[str, str]:
    """Body of ``/series``: one downsampled per-step column or scalar tag.

    Args:
      snapshot: The logdir snapshot.
      run: Run name.
      tag: A per-step column (``loss``, ``grad_norm``, ...) or a scalar tag.
      source: ``"steps"`` or ``"scalars"`` to disambiguate; by default the
        per-step columns are looked up first. ``"per_batch"``: the per-batch
        values recovered from Keras' running-mean ``batch_loss``
        (`tb_stability.running_mean`).
      max_points: Upper bound on the points returned.
    """
    run = _known_run(snapshot, run)
    tag = require(tag, "tag")
    if source not in (None, "", "steps", "scalars", "per_batch"):
        raise errors.InvalidArgumentError("source must be 'steps', 'scalars' or 'per_batch'")
    data = _run_data(snapshot, run)
    series, found = None, None
    if source == "per_batch":
        series, found = running_mean.per_batch(data, tag), "per_batch"
    for candidate in ("steps", "scalars"):
        if source and source != candidate:
            continue
        series = getattr(data, candidate).get(tag)
        if series is not None:
            found = candidate
            break
    if series is None:
        raise errors.NotFoundError(f"run {run!r} has no series {tag!r}")
    body = {"run": run, "tag": tag, "source": found}
    body.update(downsample.downsample_series(series.steps, series.values, max_points))
    return _dumps(body), JSON_MIME


def matrix_impl(
    snapshot: Snapshot,
    run: str | None,
    quantity: str | None,
    max_steps: int = MAX_MATRIX_STEPS,
    max_names: int = MAX_MATRIX_NAMES,
) -> tuple[str, str]:
    """Body of ``/matrix``: a per-variable or per-layer quantity, downsampled."""
    run = _known_run(snapshot, run)
    quantity = require(quantity, "quantity")
    data = _run_data(snapshot, run)
    for group in ("variables", "layers"):
        matrix = getattr(data, group).get(quantity)
        if matrix is not None:
            break
    else:
        raise errors.NotFoundError(f"run {run!r} has no per-layer quantity {quantity!r}")
    body = {"run": run, "quantity": quantity, "group": group}
    body.update(
        downsample.downsample_matrix(
            matrix.steps, matrix.names, matrix.values, max_steps, max_names,
            missing=matrix.missing,
        )
    )
    if any(len(n) > MAX_NAME_LEN for n in body.get("names", [])):
        body["names"] = [_cut(n, MAX_NAME_LEN)[0] for n in body["names"]]
        body["truncated_names"] = True
    return _dumps(body), JSON_MIME


def info_impl(snapshot: Snapshot, run: str | None) -> tuple[str, str]:
    """Body of ``/info``: the run's JSON records (run info, NaN origin) and warnings."""
    run = _known_run(snapshot, run)
    data = snapshot.runs.get(run)
    records: dict[str, list[dict[str, Any]]] = {}
    if data is not None:
        for tag, items in sorted(data.json.items()):
            records[tag] = [
                {"step": int(step), "value": value} for step, value in items[-MAX_JSON_RECORDS:]
            ]
    entry = snapshot.report_entry(run) or {}
    body = {
        "run": run,
        "records": records,
        "warnings": _warnings(entry.get("warnings", []))[0],
    }
    return _dumps(_json_safe(body)), JSON_MIME


def _json_safe(value: Any) -> Any:
    """Non-finite floats become strings; anything else unknown becomes `str`."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return downsample.json_number(value)
    return str(value)
