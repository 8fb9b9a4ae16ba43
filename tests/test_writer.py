"""Writer and TFRecord framing tests."""

from __future__ import annotations

import os
import re
import struct

import numpy as np
import pytest
from tensorboard.compat.proto import event_pb2, summary_pb2

from tb_stability import schema
from tb_stability.reader import tfrecord
from tb_stability.writer import StabilityWriter


def test_crc32c_known_vectors_and_fallback_agrees():
    # RFC 3720 check value, and the iSCSI test vector of 32 zero bytes.
    assert tfrecord.crc32c(b"123456789") == 0xE3069283
    assert tfrecord.crc32c_python(b"123456789") == 0xE3069283
    assert tfrecord.crc32c_python(b"\x00" * 32) == 0x8A9136AA
    rng = np.random.default_rng(0)
    for size in (0, 1, 7, 8, 9, 63, 1000):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert tfrecord.crc32c_python(data) == tfrecord.crc32c(data)


def test_record_framing_layout():
    record = tfrecord.encode_record(b"hello")
    length, length_crc = struct.unpack("<QI", record[:12])
    assert length == 5 and record[12:17] == b"hello"
    assert length_crc == tfrecord.masked_crc32c(record[:8])
    assert struct.unpack("<I", record[17:])[0] == tfrecord.masked_crc32c(b"hello")
    # Masking: rotate right by 15 and add the TFRecord delta.
    crc = tfrecord.crc32c(b"hello")
    assert tfrecord.masked_crc32c(b"hello") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32
    frames = list(tfrecord.iter_records(record * 3))
    assert [bytes(p) for _, _, p in frames] == [b"hello"] * 3
    assert [o for o, _, _ in frames] == [0, 21, 42]


def _events(path):
    data = open(path, "rb").read()
    return [event_pb2.Event.FromString(p) for _, _, p in tfrecord.iter_records(data)]


def test_file_name_first_event_and_metadata_once_per_tag(tmp_path):
    with StabilityWriter(tmp_path / "run", wall_time=123.5) as writer:
        writer.write_variables(0, "grad_norm", ("a", "b"), [1.0, 2.0])
        writer.write_variables(1, "grad_norm", ("a", "b"), [3.0, 4.0])
        writer.write_json(schema.TAG_RUN_INFO, 0, {"x": [1, 2]})
    name = os.path.basename(writer.path)
    assert re.fullmatch(r"events\.out\.tfevents\.\d{10}\.[^.]+.*\.\d+\.\d+\.stability", name)
    events = _events(writer.path)
    assert events[0].file_version == "brain.Event:2"
    assert all(e.wall_time == 123.5 for e in events)
    first, second, info = (e.summary.value[0] for e in events[1:])
    assert first.metadata.plugin_data.plugin_name == schema.PLUGIN_NAME
    assert first.metadata.data_class == summary_pb2.DATA_CLASS_TENSOR
    assert schema.parse_content(first.metadata.plugin_data.content).names == ("a", "b")
    assert not second.HasField("metadata")
    assert info.tensor.string_val == [b'{"x": [1, 2]}']


def test_scalar_is_written_like_keras(tmp_path):
    with StabilityWriter(tmp_path) as writer:
        writer.write_scalar("epoch_loss", 4, 0.25)
    value = _events(writer.path)[1].summary.value[0]
    assert value.metadata.plugin_data.plugin_name == "scalars"
    assert value.metadata.data_class == summary_pb2.DATA_CLASS_SCALAR
    assert value.tensor.dtype == 1 and list(value.tensor.tensor_shape.dim) == []
    assert np.frombuffer(value.tensor.tensor_content, "<f4").tolist() == [0.25]


def test_write_steps_validates_shape_and_uses_last_step(tmp_path):
    with StabilityWriter(tmp_path) as writer:
        with pytest.raises(ValueError):
            writer.write_steps(np.zeros((3, 2)))
        block = np.zeros((3, 5))
        block[:, 0] = [7, 8, 9]
        writer.write_steps(block)
    event = _events(writer.path)[1]
    assert event.step == 9
    assert [d.size for d in event.summary.value[0].tensor.tensor_shape.dim] == [3, 5]
