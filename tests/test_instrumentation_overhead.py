"""Cheap host path of the instrumentation: one batched read, hand-encoded summaries."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from instrumentation import readback  # noqa: E402
from instrumentation.event_encoding import encode_summary  # noqa: E402
from instrumentation.writer import SummaryWriter, _metadata  # noqa: E402
from tb_stability.reader import load_run  # noqa: E402


@pytest.mark.parametrize("array", [
    np.arange(6, dtype=np.float64).reshape(2, 3),
    np.array([1.5, -2.0, np.nan, np.inf], np.float32),
    np.zeros((0, 5), np.float64),
    np.full((300,), 3.0, np.float32),
])
def test_encoded_summary_parses_like_tf_summary_write(array):
    from tensorflow.core.framework import summary_pb2

    meta = _metadata("grad_norm", ["a", "b"])
    encoded = encode_summary("stability/x", array, meta)
    summary = summary_pb2.Summary.FromString(encoded)
    assert summary.SerializeToString() == encoded  # protobuf's own bytes, field for field
    value = summary.value[0]
    back = tf.make_ndarray(value.tensor)
    assert value.tag == "stability/x"
    assert value.metadata.SerializeToString() == meta
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_batched_writes_are_read_back_by_the_reader(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    names = ("dense/kernel", "dense/bias")
    with writer.batch():
        for step in range(3):
            writer.write_variables(step, np.full((3, 2), step, np.float32), names)
        writer.write_steps(np.array([[s, 1.0 + s, 0.5, 0.0, 1e-3] for s in range(3)]))
    writer.close()
    run = load_run(str(tmp_path))
    np.testing.assert_array_equal(run.steps["loss"].values, [1.0, 2.0, 3.0])
    matrix = run.variables["grad_norm"]
    np.testing.assert_array_equal(matrix.steps, [0, 1, 2])
    assert tuple(matrix.names) == names
    np.testing.assert_array_equal(np.asarray(matrix.values)[:, 0], [0.0, 1.0, 2.0])


def test_batched_read_returns_every_variable_exactly():
    variables = [tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3)),
                 tf.Variable(np.int64(2**40 + 1)),
                 tf.Variable(np.array([np.nan, -1.0], np.float64)),
                 tf.Variable(np.zeros((0, 4), np.float32))]
    batch = readback.BatchedRead()
    batch.refresh(variables)
    assert not batch.failed
    for variable in variables:
        got = batch.fetch(variable)
        expected = variable.numpy()
        assert got.shape == expected.shape and got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
    variables[0].assign(tf.ones([2, 3]))
    batch.refresh(variables)  # same set: no retrace, fresh values
    np.testing.assert_array_equal(batch.fetch(variables[0]), np.ones((2, 3), np.float32))
    batch.clear()
    other = tf.Variable([7.0])
    np.testing.assert_array_equal(readback.fetch(other, batch), [7.0])  # not in the batch


def test_benign_loss_scale_skips_do_not_trigger_nan_forensics(tmp_path, caplog):
    from tests.test_mixed_precision import _fit_mixed

    caplog.set_level("WARNING")
    rng = np.random.RandomState(0)
    x = rng.randn(16 * 8, 4).astype("float32")
    y = (x @ rng.randn(4, 1)).astype("float32")
    run = _fit_mixed(tmp_path, x, y, "mse", initial_scale=2.0 ** 20)
    assert run.steps["skipped"].values.sum() >= 1  # the scenario really skipped steps
    assert not (tmp_path / "nan_origin").exists()
    assert not any("non-finite values at step" in r.getMessage() for r in caplog.records)


def test_hand_encoded_events_are_what_tensorboard_reads(tmp_path):
    # The writer encodes Event/Summary protos itself: TensorBoard's own data
    # provider must see the epoch scalars as scalars and the JSON as a string.
    from tensorboard.backend.event_processing import data_provider as tb_data_provider
    from tensorboard.backend.event_processing import plugin_event_multiplexer

    writer = SummaryWriter(str(tmp_path / "run"))
    with writer.batch():
        writer.write_scalars(0, {"epoch_loss": 0.75, "epoch_lr": np.float32(0.01)})
        writer.write_scalars(1, {"epoch_loss": 0.5, "not_a_number": "x"})
    writer.write_json("stability/run_info", 0, {"every": 7})
    writer.close()
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    provider = tb_data_provider.MultiplexerDataProvider(multiplexer, str(tmp_path))
    from tensorboard import context as tb_context

    context = tb_context.RequestContext()
    scalars = provider.list_scalars(context, experiment_id="", plugin_name="scalars")
    assert set(scalars["run"]) == {"epoch_loss", "epoch_lr"}
    read = provider.read_scalars(context, experiment_id="", plugin_name="scalars",
                                 downsample=100, run_tag_filter=None)
    assert [(p.step, p.value) for p in read["run"]["epoch_loss"]] == [(0, 0.75), (1, 0.5)]
    (event,) = multiplexer.Tensors("run", "stability/run_info")
    assert tf.make_ndarray(event.tensor_proto).item() == b'{"every": 7}'
