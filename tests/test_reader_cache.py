"""The reader's per-file cache and incremental reads of growing files."""

from __future__ import annotations

import os

import numpy as np

from tb_stability.reader import LogdirReader, decode
from tb_stability.reader.tfrecord import encode_record
from tb_stability.writer import StabilityWriter
from tests.test_reader import steps_block, write_instrumented_run


def _count_parses(monkeypatch):
    calls = []
    real = decode.read_file_into

    def counting(state, buf, start):
        calls.append((os.path.basename(state.path), start, len(buf)))
        return real(state, buf, start)

    monkeypatch.setattr("tb_stability.reader.read_file_into", counting)
    return calls


def test_unchanged_files_are_not_parsed_again(tmp_path, monkeypatch):
    calls = _count_parses(monkeypatch)
    write_instrumented_run(tmp_path / "a")
    write_instrumented_run(tmp_path / "b")
    reader = LogdirReader()
    first = reader.load_logdir(tmp_path)
    assert len(calls) == 2
    second = reader.load_logdir(tmp_path)
    assert len(calls) == 2
    np.testing.assert_array_equal(first.runs["a"].steps["loss"].values,
                                  second.runs["a"].steps["loss"].values)
    # Returned runs do not share the warnings list with the cache.
    second.runs["a"].warnings.append("mutated by a caller")
    assert reader.load_logdir(tmp_path).runs["a"].warnings == []


def test_growing_file_is_read_incrementally(tmp_path, monkeypatch):
    calls = _count_parses(monkeypatch)
    reader = LogdirReader()
    writer = StabilityWriter(tmp_path)
    writer.write_steps(steps_block(0, 10))
    writer.flush()
    assert len(reader.load_logdir(tmp_path).runs["."].steps["loss"]) == 10
    size = os.path.getsize(writer.path)
    writer.write_steps(steps_block(10, 10))
    writer.write_variables(19, "grad_norm", ("w",), [1.5])
    writer.close()
    run = reader.load_logdir(tmp_path).runs["."]
    assert calls[-1][1] == size  # continued from the saved offset
    np.testing.assert_array_equal(run.steps["loss"].steps, np.arange(20))
    # Metadata of a tag seen in the first read still applies; new tags work too.
    np.testing.assert_array_equal(run.variables["grad_norm"].values, [[1.5]])
    fresh = LogdirReader().load_logdir(tmp_path).runs["."]
    np.testing.assert_array_equal(fresh.steps["loss"].values, run.steps["loss"].values)


def test_partial_final_record_is_completed_on_next_read(tmp_path):
    reader = LogdirReader()
    writer = StabilityWriter(tmp_path)
    writer.write_steps(steps_block(0, 5))
    writer.flush()
    name = os.path.basename(writer.path)
    # Frame the next event by hand and write only half of it, as a live writer might.
    from tensorboard.compat.proto import event_pb2, summary_pb2

    from tb_stability.writer import make_tensor_proto

    value = summary_pb2.Summary.Value(tag="epoch_loss", tensor=make_tensor_proto(np.float32(0.5)))
    value.metadata.plugin_data.plugin_name = "scalars"
    record = encode_record(event_pb2.Event(step=3, summary=summary_pb2.Summary(
        value=[value])).SerializeToString())
    with open(writer.path, "ab") as handle:
        handle.write(record[:10])
    run = reader.load_logdir(tmp_path).runs["."]
    (warning,) = run.warnings
    assert name in warning and "truncated" in warning
    assert "epoch_loss" not in run.scalars
    with open(writer.path, "ab") as handle:
        handle.write(record[10:])
    run = reader.load_logdir(tmp_path).runs["."]
    assert run.warnings == []
    assert run.scalars["epoch_loss"].values.tolist() == [0.5]
    assert len(run.steps["loss"]) == 5
    writer.close()


def test_replaced_smaller_file_and_deleted_runs_are_forgotten(tmp_path):
    reader = LogdirReader()
    path = write_instrumented_run(tmp_path / "a")
    write_instrumented_run(tmp_path / "b")
    assert set(reader.load_logdir(tmp_path).runs) == {"a", "b"}
    with StabilityWriter(tmp_path / "a") as small:
        small.write_steps(steps_block(0, 3))
    os.replace(small.path, path)
    for name in os.listdir(tmp_path / "b"):
        os.remove(tmp_path / "b" / name)
    logdir = reader.load_logdir(tmp_path)
    assert set(logdir.runs) == {"a"}
    assert len(logdir.runs["a"].steps["loss"]) == 3
    assert logdir.runs["a"].variables == {}
