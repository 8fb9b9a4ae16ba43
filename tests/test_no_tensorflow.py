"""The reader side works in a process where importing TensorFlow or Keras raises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SITECUSTOMIZE = textwrap.dedent(
    """
    import sys

    class _Blocker:
        BLOCKED = ("tensorflow", "keras", "tf_keras")

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ImportError(f"{name} is blocked in this test process")
            return None

    sys.meta_path.insert(0, _Blocker())
    """
)

SCRIPT = textwrap.dedent(
    """
    import importlib, io, json, pkgutil, sys, contextlib
    import numpy as np

    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker does not work")

    import tb_stability
    from tb_stability import cli, schema
    from tb_stability.reader import load_logdir
    from tb_stability.writer import StabilityWriter

    logdir = sys.argv[1]
    with StabilityWriter(logdir + "/nested/run") as writer:
        block = np.zeros((10, 5)); block[:, 0] = np.arange(10); block[:, 1] = 0.5
        writer.write_steps(block)
        writer.write_variables(9, "grad_norm", ["w"], [1.0])
        writer.write_json(schema.TAG_RUN_INFO, 0, {"ok": True})
        writer.write_scalar("epoch_loss", 0, 0.5)
    run = load_logdir(logdir).runs["nested/run"]
    assert run.steps["loss"].values.tolist() == [0.5] * 10, run
    assert run.scalars["epoch_loss"].values.tolist() == [0.5]

    codes = {}
    for fmt in ("text", "json", "markdown"):
        with contextlib.redirect_stdout(io.StringIO()) as out, \\
                contextlib.redirect_stderr(io.StringIO()):
            codes[fmt] = cli.main(["report", logdir, "--format", fmt])
        if fmt == "json":
            runs = [r["run"] for r in json.loads(out.getvalue())["runs"]]

    # `replay` needs the training side: a clear one-line error, exit 2, no traceback.
    with contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()) as err:
        codes["replay"] = cli.main(["replay", logdir])
    replay_error = err.getvalue()

    # Every module of the package, the plugin and the detectors included once present.
    imported = []
    for info in pkgutil.walk_packages(tb_stability.__path__, "tb_stability."):
        importlib.import_module(info.name)
        imported.append(info.name)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
    print(json.dumps({"codes": codes, "runs": runs, "imported": imported, "leaked": leaked,
                      "replay_error": replay_error}))
    """
)


def test_reader_cli_and_every_module_work_without_tensorflow(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    logdir = tmp_path / "logs"
    logdir.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), REPO]))
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(logdir)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["leaked"] == []
    assert data["runs"] == ["nested/run"]
    replay_code = data["codes"].pop("replay")
    assert set(data["codes"].values()) <= {0, 1}
    assert replay_code == 2
    assert data["replay_error"].startswith("tb-stability: error: replay needs TensorFlow")
    assert data["replay_error"].count("\n") == 1
    assert {"tb_stability.reader", "tb_stability.writer", "tb_stability.cli",
            "tb_stability.analysis", "tb_stability.report_format"} <= set(data["imported"])
