"""A wheel built from the repo, installed into a fresh venv, loads the plugin and its static files."""

import glob
import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = textwrap.dedent(
    """
    import json, os, sys
    sys.modules["tensorflow"] = None  # the reader side must not need TensorFlow
    import argparse
    from tensorboard import default
    from tensorboard.backend import application
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from werkzeug.test import Client
    import tb_stability
    # Exactly how `tensorboard` finds third-party plugins: the entry point group.
    dynamic = [p for p in default.get_dynamic_plugins() if getattr(p, "__name__", "") == "StabilityPluginLoader"]
    logdir = sys.argv[1]
    flags = argparse.Namespace(logdir=logdir, path_prefix="", samples_per_plugin={},
                               window_title="", generic_data="true")
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, logdir)
    app = application.TensorBoardWSGIApp(flags, dynamic[:1], provider)
    client = Client(app)
    listing = json.loads(client.get("/data/plugins_listing").get_data())
    index = client.get("/data/plugin/stability/index.js")
    console = os.path.join(os.path.dirname(sys.executable), "tb-stability")
    print(json.dumps({
        "module": tb_stability.__file__,
        "loaders": len(dynamic),
        "listed": "stability" in listing,
        "index_status": index.status_code,
        "index_bytes": len(index.get_data()),
        "console_script": os.path.exists(console),
    }))
    """
)



def test_wheel_in_fresh_venv_loads_plugin_with_static_files(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), REPO],
        check=True, capture_output=True, text=True,
    )
    wheel = glob.glob(str(dist / "tb_stability-*.whl"))
    assert len(wheel) == 1, os.listdir(dist)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", wheel[0]], check=True)
    # Dependencies (tensorboard, numpy, protobuf) come from this environment, read-only.
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    with open(os.path.join(site, "zz_deps.pth"), "w") as handle:
        handle.write(sysconfig.get_paths()["purelib"] + "\n")
    logdir = tmp_path / "logs" / "run"
    logdir.mkdir(parents=True)
    result = subprocess.run(
        [python, "-c", CHECK, str(tmp_path / "logs")],
        check=True, capture_output=True, text=True, cwd=str(tmp_path),
    )
    import json

    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["module"].startswith(str(venv)), info
    assert info["listed"], info
    assert info["index_status"] == 200 and info["index_bytes"] > 1000, info
    assert info["console_script"], info
