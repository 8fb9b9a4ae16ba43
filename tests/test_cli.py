"""The tb-stability command line: exit codes, formats, hostile names, start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tb_stability import analysis, cli
from tests.test_analysis import critical_loss_detector, info_detector
from tests.test_reader import HOSTILE, write_instrumented_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def use_detectors(monkeypatch, detectors):
    monkeypatch.setattr(analysis, "_default_detectors", lambda warnings=None: list(detectors))


@pytest.fixture
def logdir(tmp_path):
    write_instrumented_run(tmp_path / "run1")
    write_instrumented_run(tmp_path / HOSTILE)
    return tmp_path


def test_exit_0_without_critical_findings(logdir, monkeypatch, capsys):
    use_detectors(monkeypatch, [info_detector])
    assert cli.main(["report", str(logdir)]) == 0
    out = capsys.readouterr().out
    assert "== run run1: healthy (notes only)" in out
    assert "[INFO] stalled (steps 0-1)" in out


def test_exit_1_with_a_critical_finding_and_text_details(logdir, monkeypatch, capsys):
    use_detectors(monkeypatch, [critical_loss_detector, info_detector])
    assert cli.main(["report", str(logdir), "--format", "text"]) == 1
    out = capsys.readouterr().out
    block = out.split("== run run1:")[1]
    assert block.startswith(" UNHEALTHY (1 critical, 1 info)")
    assert "[CRITICAL] nan_inf (step 99)" in block
    assert "layers:      dense/kernel" in block
    assert "evidence:    loss=inf; threshold=0.9" in block
    assert "explanation: Loss became too large." in block
    assert "remedy:      optimizer = SGD(clipnorm=1.0)" in block
    assert out.rstrip().endswith("2 run(s), 2 critical finding(s)")


def test_json_format_is_report_to_json(logdir, monkeypatch, capsys):
    use_detectors(monkeypatch, [critical_loss_detector])
    assert cli.main(["report", str(logdir), "--format", "json", "--run", "run1"]) == 1
    data = json.loads(capsys.readouterr().out)
    expected = analysis.report_to_json(
        analysis.analyze_logdir(logdir, run_filter="run1", detectors=[critical_loss_detector]))
    assert data == json.loads(json.dumps(expected))
    assert [r["run"] for r in data["runs"]] == ["run1"]
    assert data["runs"][0]["findings"][0]["severity"] == "critical"


def test_markdown_escapes_hostile_run_names(logdir, monkeypatch, capsys):
    use_detectors(monkeypatch, [critical_loss_detector])
    assert cli.main(["report", str(logdir), "--format", "markdown"]) == 1
    out = capsys.readouterr().out
    assert "<img" not in out
    assert "## Run &lt;img src=x onerror=alert(1)&gt;: UNHEALTHY" in out
    assert "### CRITICAL: nan\\_inf (step 99)" in out
    assert "  optimizer = SGD(clipnorm=1.0)" in out  # code block is verbatim


def test_text_strips_terminal_escapes(tmp_path, monkeypatch, capsys):
    write_instrumented_run(tmp_path / "evil\x1b[31mred")
    use_detectors(monkeypatch, [])
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "evil?[31mred" in out


def test_reader_warnings_go_to_stderr_in_text_mode(logdir, monkeypatch, capsys):
    (logdir / "bad").mkdir()
    (logdir / "bad" / "events.out.tfevents.1.x").write_bytes(b"junk" * 10)
    use_detectors(monkeypatch, [])
    assert cli.main(["report", str(logdir)]) == 0
    captured = capsys.readouterr()
    assert "warning: run bad: bad/events.out.tfevents.1.x: not an event file" in captured.err
    assert "warning" not in captured.out
    assert cli.main(["report", str(logdir), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    bad = [r for r in data["runs"] if r["run"] == "bad"][0]
    assert "not an event file" in bad["warnings"][0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["report", "{tmp}/missing"], "does not exist"),
        (["report", "{tmp}"], "no TensorBoard event files"),
        (["report", "{tmp}/file.txt"], "not a directory"),
        (["report", "{logdir}", "--run", "zzz"], "no run name contains"),
    ],
)
def test_exit_2_on_io_errors_with_one_line(tmp_path, logdir, capsys, argv, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "file.txt").write_text("x")
    argv = [a.format(tmp=empty, logdir=logdir) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tb-stability: error: ") and message in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("argv", [[], ["report"], ["report", "x", "--format", "yaml"], ["nope"]])
def test_exit_2_on_usage_errors(argv, capsys):
    assert cli.main(argv) == 2
    assert "usage" in capsys.readouterr().err


def test_console_script_process_and_lazy_imports(logdir):
    env = dict(os.environ, PYTHONPATH=REPO)
    code = ("import sys, tb_stability.cli; heavy = {'numpy', 'tensorboard', 'google.protobuf'}"
            " & set(sys.modules); print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
    result = subprocess.run([sys.executable, "-m", "tb_stability.cli", "report", str(logdir),
                             "--format", "json"], env=env, capture_output=True, text=True)
    assert result.returncode in (0, 1), result.stderr
    assert {r["run"] for r in json.loads(result.stdout)["runs"]} == {"run1", HOSTILE}
    missing = subprocess.run([sys.executable, "-m", "tb_stability.cli", "report",
                              str(logdir / "missing")], env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1


def test_a_run_without_scalars_is_nothing_to_check_not_healthy(tmp_path, capsys):
    tf = pytest.importorskip("tensorflow")
    with tf.summary.create_file_writer(str(tmp_path / "pictures")).as_default():
        tf.summary.image("sample", tf.zeros([1, 4, 4, 1]), step=0)
        tf.summary.text("note", "hello", step=0)
    with tf.summary.create_file_writer(str(tmp_path / "training")).as_default():
        for step in range(20):
            tf.summary.scalar("loss", 1.0 / (step + 1), step=step)
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "== run pictures: nothing to check" in out
    assert "== run training: healthy" in out
    assert cli.main(["report", str(tmp_path), "--format", "json"]) == 0
    runs = {r["run"]: r for r in json.loads(capsys.readouterr().out)["runs"]}
    assert runs["pictures"]["warnings"] == [analysis.NOTHING_TO_CHECK]
    assert runs["training"]["warnings"] == []


def test_the_run_at_the_logdirs_root_is_titled_with_its_directory(tmp_path, monkeypatch, capsys):
    """``tb-stability report .`` inside a run: TensorBoard names that run ``.``; the report's
    title adds the directory's name, and the JSON keeps TensorBoard's name."""
    write_instrumented_run(tmp_path / "lr_sweep_0.3")
    use_detectors(monkeypatch, [info_detector])
    monkeypatch.chdir(tmp_path / "lr_sweep_0.3")
    assert cli.main(["report", "."]) == 0
    assert "== run . (lr_sweep_0.3): healthy (notes only)" in capsys.readouterr().out
    assert cli.main(["report", ".", "--format", "markdown"]) == 0
    assert "## Run . (lr\\_sweep\\_0.3): healthy (notes only)" in capsys.readouterr().out
    assert cli.main(["report", ".", "--format", "json"]) == 0
    assert [r["run"] for r in json.loads(capsys.readouterr().out)["runs"]] == ["."]
    assert cli.main(["report", str(tmp_path)]) == 0
    assert "== run lr_sweep_0.3: healthy (notes only)" in capsys.readouterr().out
