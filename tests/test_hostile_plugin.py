"""Hostile requests and hostile logdirs against the ``stability`` plugin.

Through TensorBoard's real WSGI app: any query string gives 200/400/404 (never
500), static routes refuse every traversal spelling, responses stay bounded
for logdirs with thousands of runs or enormous names (and say "truncated"),
and the built panel bundle never turns data into HTML.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tensorboard import errors  # noqa: E402

from tb_stability import analysis, schema  # noqa: E402
from tb_stability.findings import Finding  # noqa: E402
from tb_stability.plugin import api  # noqa: E402
from tb_stability.plugin.data import Snapshot  # noqa: E402
from tb_stability.plugin.plugin import STATIC_DIR, static_impl  # noqa: E402
from tb_stability.rundata import RunData, Series  # noqa: E402
from tb_stability.writer import StabilityWriter  # noqa: E402
from tests import plugin_support  # noqa: E402
from tests.test_plugin import PREFIX, make_client  # noqa: E402

ROUTES = ("/runs", "/findings", "/series", "/matrix", "/info")
PARAMS = ("run", "tag", "quantity", "source")


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    return plugin_support.build_logdir(str(tmp_path_factory.mktemp("hostile_plugin") / "logs"))


@pytest.fixture(scope="module")
def client(logdir):
    return make_client(logdir)


VALUES = st.one_of(
    st.sampled_from(["", "healthy", "spiky", "loss", "grad_norm", "steps", "scalars", "..",
                     "../../etc/passwd", "%00", "\\", plugin_support.HOSTILE_RUN, "a" * 5000]),
    st.text(max_size=40),
)


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES),
       params=st.dictionaries(st.sampled_from(PARAMS), VALUES, max_size=4))
def test_any_query_is_200_400_or_404_never_500(client, route, params):
    response = client.get(PREFIX + route, query_string=params)
    assert response.status_code in (200, 400, 404), (route, params, response.status_code)
    if response.status_code == 200:
        body = json.loads(response.get_data(as_text=True))  # strict JSON
        assert isinstance(body, dict)


def test_unknown_run_is_404_and_bad_params_400_on_every_route(client):
    for route in ("/series", "/matrix", "/info", "/findings"):
        params = {"run": "no such run", "tag": "loss", "quantity": "grad_norm"}
        assert client.get(PREFIX + route, query_string=params).status_code == 404, route
        params["run"] = "healthy\0"
        assert client.get(PREFIX + route, query_string=params).status_code == 400, route
        params["run"] = "x" * 10000
        assert client.get(PREFIX + route, query_string=params).status_code == 400, route


TRAVERSALS = [
    "/static/../plugin.py", "/static/%2e%2e/plugin.py", "/static/%2E%2E%2Fplugin.py",
    "/static/..%2fplugin.py", "/static/..%5cplugin.py", "/static/..\\plugin.py",
    "/static/%252e%252e%252fplugin.py", "/static//etc/passwd", "/static/%2fetc%2fpasswd",
    "/static/index.js%00.css", "/static/index.js%00", "/static/%00", "/static/C:%5cwindows",
    "/static/....//plugin.py", "/static/./index.js", "/static/.%2e/.%2e/api.py",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_static_refuses_every_traversal_spelling(client, path):
    response = client.get(PREFIX + path)
    assert response.status_code in (400, 404), path
    body = response.get_data()
    assert b"import " not in body and b"root:" not in body and b"def " not in body


@pytest.mark.parametrize("name", ["../plugin.py", "..", ".", "/etc/passwd", "\\x.js", "a\0.js",
                                  "..\\..\\x.js", "%2e%2e", "index.js/", "", "plugin.py",
                                  os.path.join(STATIC_DIR, "index.js")])
def test_static_impl_refuses_names(name):
    with pytest.raises((errors.InvalidArgumentError, errors.NotFoundError)):
        static_impl(name)


def test_static_serves_only_bundle_files():
    for name in os.listdir(STATIC_DIR):
        body, mime = static_impl(name)
        assert body and mime


# ------------------------------------------------------------------ bounded responses


def _many_runs_snapshot(runs: int, findings_per_run: int) -> Snapshot:
    data, entries = {}, []
    for i in range(runs):
        name = f"run_{i:05d}"
        data[name] = RunData(name=name)
        found = [Finding(kind="loss_spike", severity="warning", run=name, first_step=s,
                         last_step=s, layers=["x" * 3000], evidence={"loss": float("nan")},
                         explanation="e" * 5000, remedy="r").to_json()
                 for s in range(findings_per_run)]
        entries.append({"run": name, "findings": found, "warnings": ["w" * 10] * 300})
    report = {"version": 1, "runs": entries, "warnings": ["logdir warning"] * 500}
    return Snapshot("x", data, report, [])


def test_ten_thousand_runs_give_bounded_truncated_responses():
    snapshot = _many_runs_snapshot(10_000, 3)
    body, _ = api.runs_impl(snapshot)
    assert len(body) < 5 * 2**20
    runs = json.loads(body)
    assert len(runs["runs"]) == api.MAX_RUNS and runs["truncated"] and runs["total_runs"] == 10_000
    body, _ = api.findings_impl(snapshot)
    assert len(body) < 20 * 2**20
    report = json.loads(body)
    assert report["truncated"] and report["total_runs"] == 10_000
    assert len(report["runs"]) == api.MAX_RUNS and len(report["warnings"]) == api.MAX_WARNINGS
    first = report["runs"][0]
    assert first["truncated"] and first["total_warnings"] == 300
    assert len(first["warnings"]) == api.MAX_WARNINGS
    assert all(len(f["explanation"]) < api.MAX_TEXT_LEN + 100 for f in first["findings"])
    assert all(len(l) < api.MAX_NAME_LEN + 100 for f in first["findings"] for l in f["layers"])


def test_many_findings_in_one_run_are_capped():
    snapshot = _many_runs_snapshot(1, 5000)
    report = json.loads(api.findings_impl(snapshot, "run_00000")[0])
    (entry,) = report["runs"]
    assert len(entry["findings"]) == api.MAX_FINDINGS_PER_RUN
    assert entry["total_findings"] == 5000 and entry["truncated"]


def test_small_report_is_untouched_so_panel_equals_cli(client, logdir):
    body = json.loads(client.get(PREFIX + "/findings").get_data(as_text=True))
    assert "truncated" not in body
    assert body == analysis.report_to_json(analysis.analyze_logdir(logdir))


def test_enormous_names_are_left_out_or_cut(tmp_path):
    huge = "L" * 200_000
    with StabilityWriter(tmp_path / "logs" / "big") as writer:
        steps = np.arange(20, dtype=np.float64)
        writer.write_steps(np.stack([steps, 1 / (1 + steps), np.ones(20), 0 * steps,
                                     np.full(20, 1e-3)], axis=1))
        writer.write_scalar(huge, 0, 1.0)
        writer.write_scalar("epoch_loss", 0, 1.0)
        writer.write_variables(0, "grad_norm", (huge + "/kernel", "ok/kernel"), [1.0, 2.0])
    client = make_client(str(tmp_path / "logs"))
    response = client.get(PREFIX + "/runs")
    assert response.status_code == 200 and len(response.get_data()) < 100_000
    (run,) = json.loads(response.get_data(as_text=True))["runs"]
    assert run["truncated"] and run["series"]["scalars"] == ["epoch_loss"]
    response = client.get(PREFIX + "/matrix", query_string={"run": "big", "quantity": "grad_norm"})
    assert response.status_code == 200 and len(response.get_data()) < 100_000
    matrix = json.loads(response.get_data(as_text=True))
    assert matrix["truncated_names"] and matrix["names"][1] == "ok/kernel"
    response = client.get(PREFIX + "/series", query_string={"run": "big", "tag": huge})
    assert response.status_code == 400  # over-long parameter


def test_series_and_matrix_caps_hold_on_huge_runs():
    steps = np.arange(1_000_000)
    run = RunData(name="r")
    run.steps["loss"] = Series(steps=steps, values=np.sin(steps.astype(float)))
    snapshot = Snapshot("x", {"r": run}, {"version": 1, "runs": [], "warnings": []}, [])
    body = json.loads(api.series_impl(snapshot, "r", "loss")[0])
    assert len(body["steps"]) <= api.MAX_SERIES_POINTS and body["downsampled"]


# ------------------------------------------------------------------ escaping


def test_bundle_never_turns_data_into_html():
    with open(os.path.join(STATIC_DIR, "index.js"), encoding="utf-8") as handle:
        bundle = handle.read()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "srcdoc",
                 "createContextualFragment", "DOMParser", "eval(", "new Function"):
        assert sink not in bundle, sink
    assert re.search(r"\.textContent\s*=", bundle), "the panel should set text via textContent"


def test_hostile_names_are_plain_json_strings(client):
    body = json.loads(client.get(PREFIX + "/runs").get_data(as_text=True))
    names = [r["run"] for r in body["runs"]]
    assert plugin_support.HOSTILE_RUN in names  # JSON-escaped, round-trips exactly
    response = client.get(PREFIX + "/findings", query_string={"run": plugin_support.HOSTILE_RUN})
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert schema.PLUGIN_NAME == "stability"
