"""In-process tests of the ``stability`` plugin through TensorBoard's own WSGI app."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from werkzeug import test as werkzeug_test

from tests import plugin_support
from tb_stability import analysis
from tb_stability.plugin import downsample
from tb_stability.plugin.loader import StabilityPluginLoader

PREFIX = "/data/plugin/stability"


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    return plugin_support.build_logdir(str(tmp_path_factory.mktemp("plugin") / "logs"))


def make_client(logdir: str) -> werkzeug_test.Client:
    """TensorBoard's WSGI app with the multiplexer data provider and our loader."""
    flags = argparse.Namespace(
        logdir=logdir, path_prefix="", samples_per_plugin={}, window_title="", generic_data="true"
    )
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, logdir)
    app = application.TensorBoardWSGIApp(flags, [StabilityPluginLoader], provider)
    return werkzeug_test.Client(app)


@pytest.fixture(scope="module")
def client(logdir):
    return make_client(logdir)


def get_json(client, route, status=200, **params):
    response = client.get(PREFIX + route, query_string=params)
    assert response.status_code == status, response.get_data(as_text=True)
    if status == 200:
        assert response.mimetype == "application/json"
        return json.loads(response.get_data(as_text=True))
    return None


def test_plugins_listing_has_stability(client):
    response = client.get("/data/plugins_listing")
    listing = json.loads(response.get_data(as_text=True))
    assert listing["stability"]["enabled"] is True
    assert listing["stability"]["tab_name"] == "Stability"
    assert listing["stability"]["loading_mechanism"] == {
        "type": "IFRAME", "module_path": "/data/plugin/stability/index.js"
    }


def test_findings_equal_report_to_json(client, logdir):
    expected = analysis.report_to_json(analysis.analyze_logdir(logdir))
    assert get_json(client, "/findings") == expected
    kinds = {f["kind"] for run in expected["runs"] for f in run["findings"]}
    assert {"loss_spike", "final_step_spike", "nan_inf"} <= kinds


def test_findings_filtered_to_one_run(client, logdir):
    expected = analysis.report_to_json(analysis.analyze_logdir(logdir))
    body = get_json(client, "/findings", run="spiky")
    assert body["runs"] == [r for r in expected["runs"] if r["run"] == "spiky"]
    hostile = get_json(client, "/findings", run=plugin_support.HOSTILE_RUN)
    assert hostile["runs"][0]["run"] == plugin_support.HOSTILE_RUN


def test_runs_route(client):
    runs = {r["run"]: r for r in get_json(client, "/runs")["runs"]}
    assert set(runs) == {"healthy", "spiky", "nan", plugin_support.HOSTILE_RUN}
    assert runs["healthy"]["worst_severity"] is None
    assert runs["spiky"]["worst_severity"] == "critical"
    assert runs["spiky"]["counts"] == {"critical": 1, "warning": 1, "info": 0}
    assert runs["nan"]["has_nan_origin"] is True
    assert "loss" in runs["healthy"]["series"]["steps"]
    assert "epoch_loss" in runs["healthy"]["series"]["scalars"]
    assert runs["healthy"]["matrices"]["variables"] == ["grad_norm", "update_ratio"]
    assert runs["healthy"]["matrices"]["layers"] == ["dead_fraction"]


def test_series_route_full_resolution(client):
    body = get_json(client, "/series", run="spiky", tag="loss")
    assert body["source"] == "steps"
    assert body["steps"] == list(range(plugin_support.STEPS))
    assert body["downsampled"] is False
    spike = body["values"][plugin_support.SPIKE_STEP]
    assert spike == max(body["values"])
    nan = get_json(client, "/series", run="nan", tag="loss")
    assert nan["nonfinite"][0] == 301 and nan["values"][301] == "nan"
    scalar = get_json(client, "/series", run="healthy", tag="epoch_loss")
    assert scalar["source"] == "scalars" and scalar["steps"] == [0, 1, 2, 3]


def test_matrix_route(client):
    body = get_json(client, "/matrix", run="healthy", quantity="grad_norm")
    assert body["names"] == list(plugin_support.LAYERS)
    assert body["steps"] == list(range(0, plugin_support.STEPS, 10))
    assert len(body["values"]) == len(body["steps"])
    assert all(len(row) == len(body["names"]) for row in body["values"])
    nan = get_json(client, "/matrix", run="nan", quantity="grad_norm")
    assert nan["values"][-1][0] == "nan"
    dead = get_json(client, "/matrix", run="healthy", quantity="dead_fraction")
    assert dead["group"] == "layers" and dead["names"] == list(plugin_support.ACTIVATIONS)
    assert dead["values"][-1][1] == pytest.approx(0.2 + 390 / 1000, rel=1e-6)


def test_info_route_has_nan_origin(client):
    body = get_json(client, "/info", run="nan")
    records = body["records"]["stability/nan_origin"]
    assert records[0]["step"] == 300 and records[0]["value"]["variable"] == "dense/kernel"


@pytest.mark.parametrize(
    "route, params",
    [
        ("/series", {"tag": "loss"}),
        ("/series", {"run": "", "tag": "loss"}),
        ("/series", {"run": "healthy"}),
        ("/series", {"run": "healthy", "tag": ""}),
        ("/series", {"run": "healthy", "tag": "loss", "source": "bogus"}),
        ("/matrix", {"run": "healthy"}),
        ("/matrix", {"quantity": "grad_norm"}),
        ("/info", {}),
        ("/findings", {"run": ""}),
    ],
)
def test_bad_params_are_400(client, route, params):
    get_json(client, route, status=400, **params)


@pytest.mark.parametrize(
    "route, params",
    [
        ("/series", {"run": "nope", "tag": "loss"}),
        ("/series", {"run": "healthy", "tag": "nope"}),
        ("/matrix", {"run": "nope", "quantity": "grad_norm"}),
        ("/matrix", {"run": "healthy", "quantity": "saturated_fraction"}),
        ("/findings", {"run": "nope"}),
        ("/info", {"run": "nope"}),
    ],
)
def test_unknown_things_are_404(client, route, params):
    get_json(client, route, status=404, **params)


def test_static_files_served_with_mime(client):
    index = client.get(PREFIX + "/index.js")
    assert index.status_code == 200
    assert index.mimetype == "text/javascript"
    assert b"render" in index.get_data()
    style = client.get(PREFIX + "/style.css")
    assert style.status_code == 200 and style.mimetype == "text/css"
    again = client.get(PREFIX + "/static/style.css")
    assert again.get_data() == style.get_data()


@pytest.mark.parametrize(
    "path",
    [
        "/static/../plugin.py",
        "/static/%2e%2e/plugin.py",
        "/static/..%2fplugin.py",
        "/static/%2e%2e%2f%2e%2e%2fdata.py",
        "/static/..%5cplugin.py",
        "/static/.hidden",
        "/static/",
        "/static/nope.js",
        "/static/%2fetc%2fpasswd",
    ],
)
def test_static_refuses_traversal(client, path):
    response = client.get(PREFIX + path)
    assert response.status_code in (400, 404)
    assert b"import " not in response.get_data()
    assert b"root:" not in response.get_data()


def test_downsampled_series_keeps_spikes_nans_and_last_point():
    rng = np.random.default_rng(1)
    steps = np.arange(100_000)
    values = rng.random(100_000)
    values[12_345] = 1e6
    values[54_321] = np.nan
    values[77_777] = -np.inf
    values[-1] = 0.5
    body = downsample.downsample_series(steps, values, 2000)
    assert len(body["steps"]) <= 2000 and body["downsampled"] is True
    kept = dict(zip(body["steps"], body["values"]))
    assert kept[12_345] == 1e6 and kept[54_321] == "nan" and kept[77_777] == "-inf"
    assert body["steps"][-1] == 99_999 and body["steps"][0] == 0
    assert body["nonfinite"] == [54_321, 77_777]
    # Every bucket's min and max survive: the kept extremes equal the true ones.
    finite = values[np.isfinite(values)]
    numbers = [v for v in body["values"] if isinstance(v, float)]
    assert max(numbers) == finite.max() and min(numbers) == finite.min()


def test_downsampled_matrix_is_bounded_and_keeps_nonfinite():
    values = np.ones((5000, 300))
    values[4321, 7] = np.nan
    values[100, 3] = 50.0
    body = downsample.downsample_matrix(np.arange(5000) * 2, [f"l{i}" for i in range(300)], values, 400, 256)
    assert len(body["steps"]) <= 400 and len(body["names"]) == 256
    assert body["truncated_names"] and body["total_names"] == 300
    flat = {(i, j): v for i, row in enumerate(body["values"]) for j, v in enumerate(row)}
    assert [k for k, v in flat.items() if v == "nan"] and max(
        v for v in flat.values() if isinstance(v, float)) == 50.0
    assert body["step_ends"][-1] == 9998


def test_matrix_entries_no_record_held_are_null_not_nan(tmp_path):
    """A variable added half-way (layers unfrozen): its earlier cells are not non-finite."""
    logdir = str(tmp_path / "logs")
    plugin_support.write_disconnected_run(logdir)
    body = get_json(make_client(logdir), "/matrix", run="disconnected", quantity="grad_norm")
    late = body["names"].index(plugin_support.LATE_VARIABLE)
    for step, row in zip(body["steps"], body["values"]):
        if step < plugin_support.LATE_STEP:
            assert row[late] is None
        else:
            assert row[late] == pytest.approx(0.05)
    assert all(v is not None for row in body["values"] for j, v in enumerate(row) if j != late)
    assert "nan" not in {v for row in body["values"] for v in row if isinstance(v, str)}


def test_downsampled_matrix_reduces_over_recorded_entries_only():
    values = np.ones((100, 2))
    missing = np.zeros((100, 2), bool)
    values[:60, 1], missing[:60, 1] = np.nan, True  # column 1 recorded from row 60 on
    values[70, 1] = 3.0
    body = downsample.downsample_matrix(np.arange(100), ["a", "b"], values, 10, 10, missing=missing)
    column = [row[1] for row in body["values"]]
    assert column == [None] * 6 + [1.0, 3.0, 1.0, 1.0]
    assert [row[0] for row in body["values"]] == [1.0] * 10
    mixed = np.ones((100, 2))
    mixed[:55, 1], gaps = np.nan, np.zeros((100, 2), bool)
    gaps[:55, 1] = True  # the block of rows 50-59 holds five recorded values
    body = downsample.downsample_matrix(np.arange(100), ["a", "b"], mixed, 10, 10, missing=gaps)
    assert [row[1] for row in body["values"]][5] == 1.0


def test_cache_picks_up_new_runs(tmp_path):
    logdir = plugin_support.build_logdir(str(tmp_path / "logs"))
    client = make_client(logdir)
    before = {r["run"] for r in get_json(client, "/runs")["runs"]}
    loss = np.linspace(1.0, 0.5, 200)
    loss[-1] = 50.0
    plugin_support._write_run(os.path.join(logdir, "late"), loss, np.ones(200))
    after = get_json(client, "/findings")
    assert {r["run"] for r in after["runs"]} == before | {"late"}
    assert after == analysis.report_to_json(analysis.analyze_logdir(logdir))


def test_inactive_on_empty_logdir(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    client = make_client(str(empty))
    listing = json.loads(client.get("/data/plugins_listing").get_data(as_text=True))
    assert listing["stability"]["enabled"] is False
    assert get_json(client, "/runs")["runs"] == []


def test_findings_equal_cli_json(client, logdir, capsys):
    from tb_stability import cli

    status = cli.main(["report", logdir, "--format", "json"])
    printed = json.loads(capsys.readouterr().out)
    assert status == 1  # the logdir has critical findings
    assert get_json(client, "/findings") == printed


def test_plugin_works_without_tensorflow(logdir):
    import subprocess
    import sys

    code = (
        "import sys, json; sys.modules['tensorflow'] = None\n"
        "from tb_stability.plugin import api, data\n"
        "snap = data.LogdirCache(sys.argv[1]).snapshot()\n"
        "print(len(json.loads(api.runs_impl(snap)[0])['runs']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, logdir], capture_output=True, text=True,
                         cwd=plugin_support.REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "4"


def test_a_run_without_scalars_is_listed_as_not_checked(tmp_path):
    tf = pytest.importorskip("tensorflow")
    with tf.summary.create_file_writer(str(tmp_path / "pictures")).as_default():
        tf.summary.image("sample", tf.zeros([1, 4, 4, 1]), step=0)
    with tf.summary.create_file_writer(str(tmp_path / "training")).as_default():
        for step in range(20):
            tf.summary.scalar("loss", 1.0 / (step + 1), step=step)
    runs = {r["run"]: r for r in get_json(make_client(str(tmp_path)), "/runs")["runs"]}
    assert (runs["pictures"]["checked"], runs["pictures"]["worst_severity"]) == (False, None)
    assert runs["pictures"]["warnings"] == 1
    assert (runs["training"]["checked"], runs["training"]["instrumented"]) == (True, False)
