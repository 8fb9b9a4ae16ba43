"""The reader's compact storage: chunked reads, shared read-only arrays, segments."""

from __future__ import annotations

import os

import numpy as np
import pytest
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2

import tb_stability.reader as reader_module
from tb_stability import schema
from tb_stability.reader import LogdirReader
from tb_stability.reader.tfrecord import iter_records
from tb_stability.writer import StabilityWriter
from tests.test_reader import VARS, run_tags, steps_block, write_instrumented_run


def _same_run(a, b) -> None:
    assert run_tags(a) == run_tags(b) and a.warnings == b.warnings
    for column in a.steps:
        np.testing.assert_array_equal(a.steps[column].steps, b.steps[column].steps)
        np.testing.assert_array_equal(a.steps[column].values, b.steps[column].values)
    for group_a, group_b in ((a.variables, b.variables), (a.layers, b.layers),
                             (a.inputs, b.inputs)):
        for name in group_a:
            assert group_a[name].names == group_b[name].names
            np.testing.assert_array_equal(group_a[name].steps, group_b[name].steps)
            np.testing.assert_array_equal(group_a[name].values, group_b[name].values)
    for tag in a.scalars:
        np.testing.assert_array_equal(a.scalars[tag].values, b.scalars[tag].values)
    assert a.json == b.json


@pytest.mark.parametrize("chunk", [40, 200, 1000])
def test_small_read_chunks_give_the_same_data(tmp_path, monkeypatch, chunk):
    write_instrumented_run(tmp_path)
    whole = LogdirReader().load_logdir(tmp_path).runs["."]
    # Records are larger than 40 bytes: a record spans several chunks.
    monkeypatch.setattr(reader_module, "CHUNK_BYTES", chunk)
    chunked = LogdirReader().load_logdir(tmp_path).runs["."]
    assert chunked.warnings == []
    _same_run(chunked, whole)


def test_small_read_chunks_keep_truncation_and_corruption_warnings(tmp_path, monkeypatch):
    path = write_instrumented_run(tmp_path / "t")
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(size - 7)
    data = bytearray(open(write_instrumented_run(tmp_path / "c"), "rb").read())
    data[len(data) // 2] ^= 0x10
    (name,) = os.listdir(tmp_path / "c")
    (tmp_path / "c" / name).write_bytes(bytes(data))
    expected = LogdirReader().load_logdir(tmp_path)
    monkeypatch.setattr(reader_module, "CHUNK_BYTES", 64)
    chunked = LogdirReader().load_logdir(tmp_path)
    for run in ("t", "c"):
        assert chunked.runs[run].warnings == expected.runs[run].warnings
        assert len(chunked.runs[run].warnings) == 1
        _same_run(chunked.runs[run], expected.runs[run])
    assert "truncated" in chunked.runs["t"].warnings[0]
    assert "CRC mismatch" in chunked.runs["c"].warnings[0]


def test_corrupt_header_in_a_later_chunk_is_not_reread(tmp_path, monkeypatch):
    path = write_instrumented_run(tmp_path)
    data = bytearray(open(path, "rb").read())
    last_offset = [offset for offset, _, _ in iter_records(bytes(data))][-2]
    data[last_offset] ^= 0x01  # a length CRC mismatch near the end: the file is dead there
    with open(path, "wb") as handle:
        handle.write(bytes(data))
    monkeypatch.setattr(reader_module, "CHUNK_BYTES", 100)
    calls = []
    real = reader_module.read_file_into
    monkeypatch.setattr(reader_module, "read_file_into",
                        lambda *args: calls.append(args[2]) or real(*args))
    reader = LogdirReader()
    first = reader.load_logdir(tmp_path).runs["."]
    assert "length CRC mismatch" in first.warnings[0]
    count = len(calls)
    second = reader.load_logdir(tmp_path).runs["."]
    assert len(calls) == count  # unchanged file: not read again, even after a fatal error
    assert second.warnings == first.warnings


def test_block_columns_share_one_read_only_steps_array(tmp_path):
    write_instrumented_run(tmp_path)
    run = LogdirReader().load_logdir(tmp_path).runs["."]
    loss, grad = run.steps["loss"], run.steps["grad_norm"]
    assert loss.steps is grad.steps
    assert loss.values.flags.c_contiguous and loss.values.dtype == np.float64
    assert run.variables["grad_norm"].values.dtype == np.float64
    for array in (loss.steps, loss.values, run.variables["grad_norm"].values,
                  run.variables["grad_norm"].steps, run.scalars["epoch_loss"].values):
        assert not array.flags.writeable
        with pytest.raises(ValueError):
            array[0] = 1.0


def test_growing_file_keeps_one_segment_per_tag(tmp_path):
    reader = LogdirReader()
    writer = StabilityWriter(tmp_path)
    for b in range(5):
        writer.write_steps(steps_block(b * 10, 10))
        writer.write_variables(b * 10 + 9, "grad_norm", VARS, [b, b + 0.5, 1.0])
        writer.write_scalar("epoch_loss", b, 1.0 / (b + 1))
        writer.flush()
        run = reader.load_logdir(tmp_path).runs["."]
        assert len(run.steps["loss"]) == (b + 1) * 10
    writer.close()
    (state,) = reader._files.values()
    assert len(state.blocks) == 1 and len(state.tensors[schema.variable_tag("grad_norm")]) == 1
    assert len(state.scalars["epoch_loss"]) == 1
    fresh = LogdirReader().load_logdir(tmp_path).runs["."]
    _same_run(run, fresh)
    np.testing.assert_array_equal(run.variables["grad_norm"].values[:, 0], np.arange(5))


def _value_event(step, tag, tensor, metadata=None):
    value = summary_pb2.Summary.Value(tag=tag, tensor=tensor)
    if metadata is not None:
        value.metadata.CopyFrom(metadata)
    return event_pb2.Event(step=step, wall_time=1.0, summary=summary_pb2.Summary(value=[value]))


def test_tensors_without_tensor_content_and_changing_dtypes_mix(tmp_path):
    """float_val records, float64 content and a constant fill all land in one matrix."""
    tag = schema.variable_tag("grad_norm")
    metadata = schema.create_summary_metadata("grad_norm", names=("a", "b"))
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=2)])
    with StabilityWriter(tmp_path) as writer:
        writer.write_event(_value_event(0, tag, tensor_pb2.TensorProto(
            dtype=1, tensor_shape=shape, float_val=[1.0, 2.0]), metadata))
        writer.write_event(_value_event(1, tag, tensor_pb2.TensorProto(
            dtype=2, tensor_shape=shape,
            tensor_content=np.array([3.0, 4.0], "<f8").tobytes())))
        writer.write_event(_value_event(2, tag, tensor_pb2.TensorProto(
            dtype=1, tensor_shape=shape, float_val=[5.0])))  # constant fill
        writer.write_event(_value_event(3, tag, tensor_pb2.TensorProto(
            dtype=1, tensor_shape=shape,
            tensor_content=np.array([6.0, 7.0], "<f4").tobytes())))
        writer.write_event(_value_event(1, tag, tensor_pb2.TensorProto(
            dtype=1, tensor_shape=shape,
            tensor_content=np.array([8.0, 9.0], "<f4").tobytes())))  # rewrite of step 1
    run = LogdirReader().load_logdir(tmp_path).runs["."]
    assert run.warnings == []
    matrix = run.variables["grad_norm"]
    assert matrix.names == ("a", "b")
    np.testing.assert_array_equal(matrix.steps, [0, 1, 2, 3])
    np.testing.assert_array_equal(matrix.values, [[1, 2], [8, 9], [5, 5], [6, 7]])


def test_wrong_content_size_is_a_warning_and_other_records_stay(tmp_path):
    tag = schema.variable_tag("grad_norm")
    metadata = schema.create_summary_metadata("grad_norm", names=("a", "b"))
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=2)])
    with StabilityWriter(tmp_path) as writer:
        for step, values in enumerate([[1.0, 2.0], [3.0], [4.0, 5.0]]):
            writer.write_event(_value_event(step, tag, tensor_pb2.TensorProto(
                dtype=1, tensor_shape=shape,
                tensor_content=np.array(values, "<f4").tobytes()),
                metadata if step == 0 else None))
    run = LogdirReader().load_logdir(tmp_path).runs["."]
    (warning,) = run.warnings
    assert "'stability/var/grad_norm' at step 1" in warning and "values for shape" in warning
    np.testing.assert_array_equal(run.variables["grad_norm"].steps, [0, 2])
    np.testing.assert_array_equal(run.variables["grad_norm"].values, [[1, 2], [4, 5]])


def test_blocks_without_step_column_end_at_the_event_step(tmp_path):
    columns = ("loss", "grad_norm")
    with StabilityWriter(tmp_path) as writer:
        metadata = schema.create_summary_metadata("steps", names=columns)
        from tb_stability.writer import make_tensor_proto

        writer.write_event(_value_event(9, schema.TAG_STEPS, make_tensor_proto(
            np.stack([np.arange(10.0), -np.arange(10.0)], axis=1)), metadata))
        writer.write_event(_value_event(12, schema.TAG_STEPS, make_tensor_proto(
            np.array([[100.0, 0.0], [110.0, 1.0], [120.0, 2.0]]))))
    run = LogdirReader().load_logdir(tmp_path).runs["."]
    assert run.warnings == []
    np.testing.assert_array_equal(run.steps["loss"].steps, np.arange(13))
    np.testing.assert_array_equal(run.steps["loss"].values[-3:], [100, 110, 120])
    np.testing.assert_array_equal(run.steps["grad_norm"].values[:10], -np.arange(10.0))
