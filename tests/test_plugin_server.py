"""The plugin inside a real ``tensorboard`` process (Python multiplexer and Rust data server)."""

from __future__ import annotations

import json
import os
import urllib.error

import pytest

from tb_stability import analysis
from tests import plugin_support


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    return plugin_support.build_logdir(str(tmp_path_factory.mktemp("server") / "logs"))


@pytest.mark.skipif(
    not os.path.exists(plugin_support.tensorboard_binary()), reason="no tensorboard binary"
)
@pytest.mark.parametrize("load_fast", ["false", None], ids=["load_fast=false", "default"])
def test_real_tensorboard_serves_plugin(logdir, load_fast):
    expected = analysis.report_to_json(analysis.analyze_logdir(logdir))
    with plugin_support.TensorBoardProcess(logdir, load_fast=load_fast) as tb:
        listing = tb.get_json("/data/plugins_listing")
        assert "stability" in listing, tb.log_text()
        assert listing["stability"]["enabled"] is True
        assert tb.get_json("/data/plugin/stability/findings") == expected
        runs = tb.get_json("/data/plugin/stability/runs")["runs"]
        assert plugin_support.HOSTILE_RUN in {r["run"] for r in runs}
        with pytest.raises(urllib.error.HTTPError) as error:
            tb.get_json("/data/plugin/stability/series?run=nope&tag=loss")
        assert error.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as error:
            tb.get_json("/data/plugin/stability/series?run=spiky")
        assert error.value.code == 400
    assert tb.proc.poll() is not None
