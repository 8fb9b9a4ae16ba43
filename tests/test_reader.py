"""Reader tests on real event files written by tb_stability.writer."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tb_stability import schema
from tb_stability.reader import LogdirError, LogdirReader, load_logdir, load_run
from tb_stability.writer import StabilityWriter

HOSTILE = "<img src=x onerror=alert(1)>"
VARS = ("dense/kernel", "dense/bias", "out/kernel")


def steps_block(first: int, count: int, loss_offset: float = 0.0) -> np.ndarray:
    """A [count, 5] steps block whose loss is step / 100 + loss_offset."""
    steps = np.arange(first, first + count, dtype=np.float64)
    return np.stack(
        [steps, steps / 100 + loss_offset, steps * 2, np.zeros(count), np.full(count, 1e-3)],
        axis=1,
    )


def write_instrumented_run(run_dir, num_blocks: int = 4, block: int = 25, every: int = 25):
    """Writes a complete instrumented run; returns the writer's file path."""
    with StabilityWriter(run_dir) as writer:
        writer.write_json(schema.TAG_RUN_INFO, 0, {"model": "mlp", "every": every})
        for b in range(num_blocks):
            writer.write_steps(steps_block(b * block, block))
            last = (b + 1) * block - 1
            writer.write_variables(last, "grad_norm", VARS, [last, last + 0.5, 1.0])
            writer.write_variables(last, "weight_norm", VARS, [2.0, 3.0, 4.0])
            writer.write_layers(last, "dead_fraction", ("dense", "out"), [0.25, 0.0])
        writer.write_inputs(0, ("age", "income"), [[1, 2], [3, 4], [5, 6], [7, 8]])
        writer.write_labels(0, ("0", "1"), [90, 10])
        writer.write_predictions(0, ("0", "1"), [100, 0])
        writer.write_scalar("epoch_loss", 0, 0.75)
        writer.write_scalar("epoch_loss", 1, 0.5)
        writer.write_legacy_scalar("legacy/acc", 7, 0.25)
        return writer.path


def run_tags(run) -> set[str]:
    """Every (kind, name) pair a RunData holds, for exact set comparisons."""
    tags = {("steps", c) for c in run.steps}
    tags |= {("var", q) for q in run.variables} | {("layer", q) for q in run.layers}
    tags |= {("inputs", r) for r in run.inputs} | {("scalar", t) for t in run.scalars}
    tags |= {("json", t) for t in run.json}
    tags |= {("labels", "")} if run.labels is not None else set()
    tags |= {("predictions", "")} if run.predictions is not None else set()
    return tags


FULL_TAGS = {
    ("steps", "loss"), ("steps", "grad_norm"), ("steps", "nonfinite_grads"),
    ("steps", "learning_rate"), ("var", "grad_norm"), ("var", "weight_norm"),
    ("layer", "dead_fraction"), ("inputs", "mean"), ("inputs", "std"), ("inputs", "min"),
    ("inputs", "max"), ("scalar", "epoch_loss"), ("scalar", "legacy/acc"),
    ("json", schema.TAG_RUN_INFO), ("labels", ""), ("predictions", ""),
}


def test_nested_and_hostile_runs_full_resolution(tmp_path):
    write_instrumented_run(tmp_path)  # the logdir itself is a run
    write_instrumented_run(tmp_path / "a" / "b" / "c")
    write_instrumented_run(tmp_path / HOSTILE)
    (tmp_path / "empty_dir" / "deeper").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("not an event file")
    logdir = load_logdir(tmp_path)
    assert set(logdir.runs) == {".", "a/b/c", HOSTILE}
    assert logdir.warnings == []
    for name, run in logdir.runs.items():
        assert run.name == name
        assert run.warnings == []
        assert run_tags(run) == FULL_TAGS
        assert run.instrumented
        loss = run.steps["loss"]
        np.testing.assert_array_equal(loss.steps, np.arange(100))
        np.testing.assert_array_equal(loss.values, np.arange(100) / 100)
        assert loss.steps.dtype == np.int64 and loss.values.dtype == np.float64
        np.testing.assert_array_equal(run.steps["grad_norm"].values, np.arange(100) * 2.0)
        grads = run.variables["grad_norm"]
        assert grads.names == VARS
        np.testing.assert_array_equal(grads.steps, [24, 49, 74, 99])
        np.testing.assert_array_equal(grads.values[:, 1], [24.5, 49.5, 74.5, 99.5])
        np.testing.assert_array_equal(run.layers["dead_fraction"].values[-1], [0.25, 0.0])
        assert run.inputs["max"].names == ("age", "income")
        np.testing.assert_array_equal(run.inputs["min"].values, [[5, 6]])
        np.testing.assert_array_equal(run.labels.values, [[90, 10]])
        assert run.predictions.names == ("0", "1")
        np.testing.assert_array_equal(run.scalars["epoch_loss"].values, [0.75, 0.5])
        np.testing.assert_array_equal(run.scalars["legacy/acc"].steps, [7])
        assert run.json[schema.TAG_RUN_INFO] == [(0, {"model": "mlp", "every": 25})]


def test_duplicate_steps_last_wins_across_files_and_unsorted_blocks(tmp_path):
    with StabilityWriter(tmp_path, filename_suffix=".1") as first:
        first.write_steps(steps_block(50, 50))
        first.write_steps(steps_block(0, 50))  # out of order
        first.write_variables(10, "update_ratio", ("w",), [1.0])
        first.write_json(schema.TAG_NAN_ORIGIN, 3, {"v": 1})
    # A restart from a checkpoint at step 80 re-logs steps 80..119 in a later file.
    with StabilityWriter(tmp_path, filename_suffix=".2") as second:
        second.write_steps(steps_block(80, 40, loss_offset=10.0))
        second.write_variables(10, "update_ratio", ("w",), [2.0])
        second.write_json(schema.TAG_NAN_ORIGIN, 3, {"v": 2})
    assert sorted(os.listdir(tmp_path))[0].endswith(".1")
    run = load_run(tmp_path)
    loss = run.steps["loss"]
    np.testing.assert_array_equal(loss.steps, np.arange(120))
    expected = np.arange(120) / 100 + np.where(np.arange(120) >= 80, 10.0, 0.0)
    np.testing.assert_allclose(loss.values, expected)
    np.testing.assert_array_equal(run.variables["update_ratio"].values, [[2.0]])
    assert run.json[schema.TAG_NAN_ORIGIN] == [(3, {"v": 2})]


def test_changing_names_are_unioned_with_nan(tmp_path):
    with StabilityWriter(tmp_path) as writer:
        writer.write_variables(0, "grad_norm", ("a", "b"), [1.0, 2.0])
        meta_v2 = schema.create_summary_metadata("grad_norm", names=("a", "c", "b"))
        # The writer writes metadata once per tag; emulate a model that grew a layer
        # by writing the second event with its own metadata.
        from tensorboard.compat.proto import event_pb2, summary_pb2

        from tb_stability.writer import make_tensor_proto

        value = summary_pb2.Summary.Value(
            tag=schema.variable_tag("grad_norm"), metadata=meta_v2,
            tensor=make_tensor_proto(np.array([3.0, 4.0, 5.0], np.float32)))
        writer.write_event(event_pb2.Event(step=1, summary=summary_pb2.Summary(value=[value])))
    matrix = load_run(tmp_path).variables["grad_norm"]
    assert matrix.names == ("a", "b", "c")
    np.testing.assert_array_equal(matrix.values, [[1.0, 2.0, np.nan], [3.0, 5.0, 4.0]])


def test_unknown_metadata_version_skips_tag_with_warning(tmp_path):
    from tensorboard.compat.proto import event_pb2, summary_pb2

    from tb_stability.writer import make_tensor_proto

    with StabilityWriter(tmp_path) as writer:
        writer.write_steps(steps_block(0, 10))
        content = schema.StabilityPluginData(version=schema.METADATA_VERSION + 1,
                                             quantity="grad_norm", names=["x"])
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(
                plugin_name=schema.PLUGIN_NAME, content=content.SerializeToString()),
            data_class=summary_pb2.DATA_CLASS_TENSOR)
        for step in range(3):
            value = summary_pb2.Summary.Value(
                tag=schema.variable_tag("grad_norm"), tensor=make_tensor_proto(np.ones(1)))
            if step == 0:
                value.metadata.CopyFrom(metadata)
            writer.write_event(event_pb2.Event(step=step, summary=summary_pb2.Summary(value=[value])))
        name = os.path.basename(writer.path)
    run = load_run(tmp_path)
    assert run.variables == {}
    assert len(run.steps["loss"]) == 10
    assert len(run.warnings) == 1
    assert name in run.warnings[0] and "version 2" in run.warnings[0]


def _other_run_loads(logdir):
    run = logdir.runs["good"]
    assert run.warnings == []
    assert len(run.steps["loss"]) == 100


def test_truncated_file_keeps_complete_records_and_warns(tmp_path):
    write_instrumented_run(tmp_path / "good")
    path = write_instrumented_run(tmp_path / "bad")
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(size - 7)
    logdir = LogdirReader().load_logdir(tmp_path)
    _other_run_loads(logdir)
    bad = logdir.runs["bad"]
    assert len(bad.warnings) == 1
    assert "bad/" + os.path.basename(path) in bad.warnings[0]
    assert "truncated" in bad.warnings[0]
    # Only the last record (legacy/acc) was lost.
    assert "legacy/acc" not in bad.scalars and len(bad.steps["loss"]) == 100


def test_flipped_byte_is_a_crc_mismatch_and_only_that_record_is_skipped(tmp_path):
    write_instrumented_run(tmp_path / "good")
    path = write_instrumented_run(tmp_path / "bad")
    data = bytearray(open(path, "rb").read())
    marker = data.find(b"legacy/acc")  # inside the last record's payload
    data[marker] ^= 0xFF
    open(path, "wb").write(bytes(data))
    logdir = LogdirReader().load_logdir(tmp_path)
    _other_run_loads(logdir)
    (warning,) = logdir.runs["bad"].warnings
    assert os.path.basename(path) in warning and "CRC mismatch" in warning
    offset = int(warning.split("offset ")[1].split(";")[0])
    assert offset < marker < offset + 200
    assert "legacy/acc" not in logdir.runs["bad"].scalars
    assert logdir.runs["bad"].scalars["epoch_loss"].values.tolist() == [0.75, 0.5]


def test_corrupt_length_header_stops_file(tmp_path):
    path = write_instrumented_run(tmp_path)
    data = bytearray(open(path, "rb").read())
    data[0] ^= 0x01  # first record's length no longer matches its CRC
    open(path, "wb").write(bytes(data))
    run = LogdirReader().load_logdir(tmp_path).runs["."]
    assert run_tags(run) == set()
    assert "length CRC mismatch at offset 0" in run.warnings[0]


@pytest.mark.parametrize(
    "content", [b"", np.random.default_rng(1).bytes(4096), b"\x00" * 100, b"\x01"]
)
def test_hostile_files_warn_and_other_runs_load(tmp_path, content):
    write_instrumented_run(tmp_path / "good")
    hostile = tmp_path / "hostile" / "events.out.tfevents.123.host"
    hostile.parent.mkdir()
    hostile.write_bytes(content)
    logdir = LogdirReader().load_logdir(tmp_path)
    _other_run_loads(logdir)
    (warning,) = logdir.runs["hostile"].warnings
    assert "hostile/events.out.tfevents.123.host" in warning


def test_undecodable_event_is_skipped(tmp_path):
    with StabilityWriter(tmp_path) as writer:
        writer.write_scalar("a", 0, 1.0)
        writer.write_raw_record(b"\xff\xff\xff garbage, not a proto")
        writer.write_scalar("a", 1, 2.0)
    run = load_run(tmp_path)
    assert run.scalars["a"].values.tolist() == [1.0, 2.0]
    (warning,) = run.warnings
    assert "undecodable event" in warning


def test_malformed_stability_tensor_is_a_warning(tmp_path):
    from tensorboard.compat.proto import event_pb2, summary_pb2

    from tb_stability.writer import make_tensor_proto

    with StabilityWriter(tmp_path) as writer:
        writer.write_steps(steps_block(0, 10))
        value = summary_pb2.Summary.Value(tag=schema.TAG_STEPS,
                                          tensor=make_tensor_proto(np.zeros((3, 4))))
        writer.write_event(event_pb2.Event(step=12, summary=summary_pb2.Summary(value=[value])))
        writer.write_steps(steps_block(10, 10))
    run = load_run(tmp_path)
    np.testing.assert_array_equal(run.steps["loss"].steps, np.arange(20))
    (warning,) = run.warnings
    assert "'stability/steps' at step 12" in warning and "does not match 5 column" in warning


def test_unreadable_directory_is_a_warning(tmp_path, monkeypatch):
    write_instrumented_run(tmp_path / "good")
    locked = tmp_path / "locked"
    write_instrumented_run(locked)
    real_scandir = os.scandir

    def scandir(path):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    logdir = LogdirReader().load_logdir(tmp_path)
    assert set(logdir.runs) == {"good"}
    (warning,) = logdir.warnings
    assert "locked" in warning and "Permission denied" in warning


def test_missing_empty_and_file_logdirs_raise_logdir_error(tmp_path):
    with pytest.raises(LogdirError, match="does not exist"):
        load_logdir(tmp_path / "missing")
    (tmp_path / "sub").mkdir()
    with pytest.raises(LogdirError, match="no TensorBoard event files"):
        load_logdir(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(LogdirError, match="not a directory"):
        load_logdir(tmp_path / "file")
    with pytest.raises(LogdirError):
        load_run(tmp_path / "sub")
