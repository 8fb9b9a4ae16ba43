"""Hostile logdirs end to end: every problem is a warning naming its file, the
rest is analysed, and every report format (text, JSON, Markdown) says what was
skipped. Real event files from `tb_stability.writer`, real CLI."""

from __future__ import annotations

import builtins
import json
import os

import numpy as np
import pytest
from tensorboard.compat.proto import event_pb2, summary_pb2

from tb_stability import analysis, cli, schema
from tb_stability.reader import LogdirReader, load_logdir
from tb_stability.writer import StabilityWriter, make_tensor_proto


def _block(first, count, loss=None):
    steps = np.arange(first, first + count, dtype=np.float64)
    loss = 1.0 / (1 + steps / 10) if loss is None else loss
    return np.stack([steps, loss, np.ones(count), np.zeros(count), np.full(count, 1e-3)], axis=1)


def _good_run(run_dir, blocks=4):
    with StabilityWriter(run_dir) as writer:
        for b in range(blocks):
            writer.write_steps(_block(b * 25, 25))
            writer.write_variables(b * 25 + 24, "grad_norm", ("a/kernel", "b/kernel"), [1.0, 2.0])
        return writer.path


def _file(run_dir, data: bytes, name="events.out.tfevents.1.host"):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, name), "wb") as handle:
        handle.write(data)


def _bytes_of(path):
    with open(path, "rb") as handle:
        return handle.read()


def _unknown_version_run(run_dir):
    with StabilityWriter(run_dir) as writer:
        writer.write_steps(_block(0, 10))
        content = schema.StabilityPluginData(version=schema.METADATA_VERSION + 7,
                                             quantity="grad_norm", names=["x"])
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(
                plugin_name=schema.PLUGIN_NAME, content=content.SerializeToString()),
            data_class=summary_pb2.DATA_CLASS_TENSOR)
        value = summary_pb2.Summary.Value(tag=schema.variable_tag("grad_norm"),
                                          tensor=make_tensor_proto(np.ones(1)), metadata=metadata)
        writer.write_event(event_pb2.Event(step=3, summary=summary_pb2.Summary(value=[value])))


def _nonfinite_run(run_dir):
    with StabilityWriter(run_dir) as writer:
        loss = np.linspace(1, 0.5, 40)
        loss[30] = np.nan
        loss[35] = np.inf
        block = _block(0, 40, loss)
        block[20, 0] = np.nan  # a NaN *step*: that row cannot be placed
        block[25, 2] = -np.inf
        writer.write_steps(block)
        writer.write_variables(39, "grad_norm", ("a", "b"), [np.nan, np.inf])
        writer.write_scalar("epoch_loss", 0, float("nan"))
        writer.write_json(schema.TAG_RUN_INFO, 0, {"lr": float("inf")})


def _missing_tags_run(run_dir):
    """Steps block with only (step, loss): no gradient columns, no variables."""
    with StabilityWriter(run_dir) as writer:
        steps = np.arange(50, dtype=np.float64)
        writer.write_steps(np.stack([steps, 1 / (1 + steps)], axis=1), columns=("step", "loss"))


@pytest.fixture()
def hostile_logdir(tmp_path):
    root = tmp_path / "logs"
    good = _good_run(root / "good")
    whole = _bytes_of(good)
    _file(root / "zero", b"")
    _file(root / "truncated", whole[: len(whole) - 7])
    crc = bytearray(whole)
    crc[len(crc) // 2] ^= 0x40
    _file(root / "crc", bytes(crc))
    _file(root / "random", np.random.default_rng(0).bytes(3000))
    _unknown_version_run(root / "future")
    _nonfinite_run(root / "nonfinite")
    _missing_tags_run(root / "missing_tags")
    _good_run(root / "locked")
    _good_run(root / "unreadable_file")
    return root


EXPECTED_RUN_WARNINGS = {
    "zero": "zero/events.out.tfevents.1.host: empty event file",
    "truncated": "truncated/events.out.tfevents.1.host: truncated record",
    "crc": "crc/events.out.tfevents.1.host: data CRC mismatch",
    "random": "random/events.out.tfevents.1.host: not an event file",
    "future": "version 8",
    "unreadable_file": "cannot read file: Permission denied",
}


@pytest.fixture()
def denied(hostile_logdir, monkeypatch):
    """Makes ``locked/`` and ``unreadable_file``'s event file unreadable.

    Tests run as root, where chmod 000 does not stop reads; monkeypatching
    `os.scandir` and `open` gives the same errors the OS would.
    """
    locked = str(hostile_logdir / "locked")
    real_scandir, real_open = os.scandir, builtins.open

    def scandir(path="."):
        if os.fspath(path).rstrip(os.sep) == locked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and "unreadable_file" in os.fspath(file) \
                and "tfevents" in os.fspath(file):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(builtins, "open", fake_open)
    return hostile_logdir


def test_every_problem_is_a_warning_naming_its_file_and_the_rest_loads(denied):
    logdir = LogdirReader().load_logdir(denied)
    assert "locked" not in logdir.runs
    (dir_warning,) = logdir.warnings
    assert "'locked'" in dir_warning and "Permission denied" in dir_warning
    for run, text in EXPECTED_RUN_WARNINGS.items():
        assert any(text in w for w in logdir.runs[run].warnings), (run, logdir.runs[run].warnings)
    good = logdir.runs["good"]
    assert good.warnings == [] and len(good.steps["loss"]) == 100
    # Partial files keep what is intact.
    truncated = logdir.runs["truncated"]  # the cut hit the last record (variables, step 99)
    assert len(truncated.steps["loss"]) == 100
    assert truncated.variables["grad_norm"].steps.tolist() == [24, 49, 74]
    crc = logdir.runs["crc"]  # exactly one record lost, the others kept
    kept = len(crc.steps["loss"]) // 25 + len(crc.variables["grad_norm"].steps)
    assert kept == 7
    # NaN/Inf are data, not errors: kept as values; only the NaN-step row is dropped.
    nonfinite = logdir.runs["nonfinite"]
    assert nonfinite.warnings == []
    loss = nonfinite.steps["loss"]
    assert len(loss) == 39 and 20 not in loss.steps.tolist()
    assert np.isnan(loss.values[loss.steps == 30]).all() and np.isinf(loss.values[loss.steps == 35]).all()
    assert logdir.runs["missing_tags"].warnings == []
    assert set(logdir.runs["missing_tags"].steps) == {"loss"}


def _cli(argv, capsys):
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_every_report_format_says_what_was_skipped(denied, capsys):
    root = str(denied)
    status, out, _ = _cli(["report", root, "--format", "json"], capsys)
    assert status == 1  # the NaN run is critical; exit 1, never 2
    report = json.loads(out)  # strict JSON (no NaN literal would parse differently)
    json.dumps(report, allow_nan=False)
    by_run = {r["run"]: r for r in report["runs"]}
    assert set(by_run) == {"good", "zero", "truncated", "crc", "random", "future", "nonfinite",
                           "missing_tags", "unreadable_file"}
    assert any("locked" in w for w in report["warnings"])
    for run, text in EXPECTED_RUN_WARNINGS.items():
        assert any(text in w for w in by_run[run]["warnings"]), run
    assert by_run["good"]["warnings"] == []
    assert "nan_inf" in {f["kind"] for f in by_run["nonfinite"]["findings"]}

    status, out, err = _cli(["report", root, "--format", "markdown"], capsys)
    assert status == 1
    assert "## Warnings" in out and "locked" in out
    for text in EXPECTED_RUN_WARNINGS.values():
        assert text.replace("_", "\\_") in out or text in out, text

    status, out, err = _cli(["report", root], capsys)
    assert status == 1
    assert "warning: cannot read directory 'locked'" in err
    for run, text in EXPECTED_RUN_WARNINGS.items():
        assert f"warning: run {run}: " in err and text in err, run
    for run in ("good", "nonfinite", "missing_tags", "crc"):
        assert f"== run {run}:" in out


def test_good_run_report_is_unaffected_by_hostile_neighbours(denied, tmp_path):
    alone = tmp_path / "alone"
    _good_run(alone / "good")
    clean = analysis.report_to_json(analysis.analyze_logdir(alone))["runs"]
    noisy = analysis.report_to_json(analysis.analyze_logdir(denied))["runs"]
    assert [r for r in noisy if r["run"] == "good"] == clean


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads chmod-000 files and directories")
def test_real_chmod_000(hostile_logdir):  # pragma: no cover - runs in non-root CI only
    os.chmod(hostile_logdir / "locked", 0)
    try:
        logdir = LogdirReader().load_logdir(hostile_logdir)
        assert "locked" not in logdir.runs
        assert any("locked" in w for w in logdir.warnings)
    finally:
        os.chmod(hostile_logdir / "locked", 0o755)


def test_same_directory_under_two_logdirs_keeps_names_and_labels_apart(tmp_path):
    """Regression: the reader cache keyed runs by joined path, so run "a/b" of
    ``logs`` and run "b" of ``logs/a`` collided (wrong run names in findings)."""
    root = tmp_path / "logs"
    _good_run(root / "a" / "b")
    _file(root / "a" / "b", b"\x00" * 5, name="events.out.tfevents.2.bad")
    outer = load_logdir(root)
    inner = load_logdir(root / "a")
    assert outer.runs["a/b"].name == "a/b" and inner.runs["b"].name == "b"
    assert any(w.startswith("a/b/events.out.tfevents.2.bad") for w in outer.runs["a/b"].warnings)
    assert any(w.startswith("b/events.out.tfevents.2.bad") for w in inner.runs["b"].warnings)
    findings = analysis.report_to_json(analysis.analyze_logdir(root / "a"))["runs"][0]["findings"]
    assert all(f["run"] == "b" for f in findings)
