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

from tb_stability.findings import SEVERITIES
from tb_stability.plugin import downsample
from tb_stability.plugin.data import Snapshot

JSON_MIME = "application/json"
# Upper bounds on what one response may hold.
MAX_SERIES_POINTS = downsample.DEFAULT_MAX_POINTS
MAX_MATRIX_STEPS = downsample.DEFAULT_MAX_STEPS
MAX_MATRIX_NAMES = downsample.DEFAULT_MAX_NAMES
MAX_JSON_RECORDS = 50
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


def runs_impl(snapshot: Snapshot) -> tuple[str, str]:
    """Body of ``/runs``: every run with worst severity, counts and available data."""
    runs = []
    for name in snapshot.run_names():
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
            "series": {"steps": [], "scalars": []},
            "matrices": {"variables": [], "layers": []},
            "has_nan_origin": False,
        }
        if data is not None:
            item["series"] = {"steps": sorted(data.steps), "scalars": sorted(data.scalars)}
            item["matrices"] = {"variables": sorted(data.variables), "layers": sorted(data.layers)}
            item["has_nan_origin"] = bool(data.json.get("stability/nan_origin"))
        runs.append(item)
    return _dumps({"runs": runs, "warnings": list(snapshot.report.get("warnings", []))}), JSON_MIME


def findings_impl(snapshot: Snapshot, run: str | None = None) -> tuple[str, str]:
    """Body of ``/findings``: ``report_to_json`` of the logdir, optionally one run."""
    if run is None:
        return _dumps(snapshot.report), JSON_MIME
    run = _known_run(snapshot, run)
    entry = snapshot.report_entry(run) or {"run": run, "findings": [], "warnings": []}
    body = dict(snapshot.report)
    body["runs"] = [entry]
    return _dumps(body), JSON_MIME


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
        per-step columns are looked up first.
      max_points: Upper bound on the points returned.
    """
    run = _known_run(snapshot, run)
    tag = require(tag, "tag")
    if source not in (None, "", "steps", "scalars"):
        raise errors.InvalidArgumentError("source must be 'steps' or 'scalars'")
    data = _run_data(snapshot, run)
    series, found = None, None
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
            matrix.steps, matrix.names, matrix.values, max_steps, max_names
        )
    )
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
        "warnings": list(entry.get("warnings", []))[:MAX_JSON_RECORDS],
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
