"""Event files written by real TensorFlow are read like the project's own writer's.

This test module (not tb_stability/) imports TensorFlow.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tb_stability import schema
from tb_stability.reader import LogdirReader
from tb_stability.reader.tfrecord import iter_records
from tb_stability.writer import StabilityWriter
from tests.test_reader import run_tags, steps_block

tf = pytest.importorskip("tensorflow")

NAMES = ("dense/kernel", "dense/bias")
INFO = {"model": "mlp", "nan": None}


def _write_with_tf(run_dir):
    from tensorboard.compat.proto import summary_pb2

    writer = tf.summary.create_file_writer(str(run_dir))
    steps_meta = schema.create_summary_metadata("steps", names=schema.STEP_COLUMNS)
    var_meta = schema.create_summary_metadata("grad_norm", names=NAMES)
    info_meta = schema.create_summary_metadata("run_info")
    with writer.as_default():
        tf.summary.write(schema.TAG_RUN_INFO, tf.constant(json.dumps(INFO)), step=0,
                         metadata=info_meta.SerializeToString())
        for b in range(3):
            block = steps_block(b * 10, 10)
            tf.summary.write(schema.TAG_STEPS, tf.constant(block, tf.float64), step=b * 10 + 9,
                             metadata=steps_meta.SerializeToString())
            tf.summary.write(schema.variable_tag("grad_norm"),
                             tf.constant([b, b + 0.5], tf.float32), step=b * 10 + 9,
                             metadata=var_meta.SerializeToString())
            tf.summary.scalar("epoch_loss", 1.0 / (b + 1), step=b)
        legacy = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag="legacy/acc",
                                                                      simple_value=0.125)])
        tf.summary.experimental.write_raw_pb(legacy.SerializeToString(), step=7)
    writer.close()


def _write_with_ours(run_dir):
    with StabilityWriter(run_dir) as writer:
        writer.write_json(schema.TAG_RUN_INFO, 0, INFO)
        for b in range(3):
            writer.write_steps(steps_block(b * 10, 10))
            writer.write_variables(b * 10 + 9, "grad_norm", NAMES, [b, b + 0.5])
            writer.write_scalar("epoch_loss", b, 1.0 / (b + 1))
        writer.write_legacy_scalar("legacy/acc", 7, 0.125)
    return writer.path


def _assert_same_series(a, b):
    np.testing.assert_array_equal(a.steps, b.steps)
    np.testing.assert_array_equal(a.values, b.values)


def test_tf_summary_files_read_identically(tmp_path):
    _write_with_tf(tmp_path / "tf")
    _write_with_ours(tmp_path / "ours")
    logdir = LogdirReader().load_logdir(tmp_path)
    theirs, ours = logdir.runs["tf"], logdir.runs["ours"]
    assert theirs.warnings == [] and ours.warnings == []
    assert run_tags(theirs) == run_tags(ours) == {
        ("steps", "loss"), ("steps", "grad_norm"), ("steps", "nonfinite_grads"),
        ("steps", "learning_rate"), ("var", "grad_norm"), ("scalar", "epoch_loss"),
        ("scalar", "legacy/acc"), ("json", schema.TAG_RUN_INFO),
    }
    for column in ours.steps:
        _assert_same_series(theirs.steps[column], ours.steps[column])
    np.testing.assert_array_equal(ours.steps["loss"].steps, np.arange(30))
    for tag in ours.scalars:
        _assert_same_series(theirs.scalars[tag], ours.scalars[tag])
    mine, tfs = ours.variables["grad_norm"], theirs.variables["grad_norm"]
    assert mine.names == tfs.names == NAMES
    np.testing.assert_array_equal(mine.values, tfs.values)
    assert theirs.json == ours.json == {schema.TAG_RUN_INFO: [(0, INFO)]}


def test_tensorflow_reads_our_framing(tmp_path):
    path = _write_with_ours(tmp_path)
    from_tf = [r.numpy() for r in tf.data.TFRecordDataset(path)]
    ours = [bytes(p) for _, _, p in iter_records(open(path, "rb").read())]
    assert from_tf == ours and len(ours) == 1 + 1 + 3 * 3 + 1


def test_keras_tensorboard_callback_scalars(tmp_path):
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(x, y, epochs=3, batch_size=16, verbose=0, validation_split=0.25,
                        callbacks=[keras.callbacks.TensorBoard(str(tmp_path))])
    logdir = LogdirReader().load_logdir(tmp_path)
    assert {"train", "validation"} <= set(logdir.runs)
    assert all(run.warnings == [] for run in logdir.runs.values())
    train = logdir.runs["train"].scalars["epoch_loss"]
    np.testing.assert_array_equal(train.steps, [0, 1, 2])
    np.testing.assert_allclose(train.values, history.history["loss"], rtol=1e-6)
    val = logdir.runs["validation"].scalars["epoch_loss"]
    np.testing.assert_allclose(val.values, history.history["val_loss"], rtol=1e-6)
    assert not logdir.runs["train"].instrumented


def _hparams_file(run_dir, values):
    from tensorboard.plugins.hparams import api as hp

    writer = tf.summary.create_file_writer(str(run_dir))
    with writer.as_default():
        hp.hparams(values)
        tf.summary.scalar("loss", 1.0, step=0)
    writer.close()


def test_hparams_session_is_read_and_a_rerun_wins(tmp_path):
    _hparams_file(tmp_path / "run", {"learning_rate": 0.02, "optimizer": "sgd", "nesterov": True, "units": 64})
    run = LogdirReader().load_logdir(tmp_path).runs["run"]
    assert run.hparams == {"learning_rate": 0.02, "optimizer": "sgd", "nesterov": True, "units": 64.0}
    assert run.warnings == []
    # The notebook cell run again with another rate: the later file's session wins.
    import time
    time.sleep(1.1)  # event file names carry the second they were created
    _hparams_file(tmp_path / "run", {"learning_rate": 0.005, "optimizer": "sgd"})
    run = LogdirReader().load_logdir(tmp_path).runs["run"]
    assert run.hparams == {"learning_rate": 0.005, "optimizer": "sgd"}


def test_pytorch_add_hparams_children_hand_their_hparams_to_the_run(tmp_path):
    """PyTorch's add_hparams writes into ``run/<time.time()>``; the run that trained gets them."""
    import shutil

    _hparams_file(tmp_path / "run", {})  # the training run: no session of its own
    _hparams_file(tmp_path / "run" / "1795000000.1234567", {"learning_rate": 0.5, "optimizer": "sgd"})
    _hparams_file(tmp_path / "run" / "1795000100.5", {"learning_rate": 0.25, "optimizer": "sgd"})
    _hparams_file(tmp_path / "own", {"learning_rate": 0.1})
    _hparams_file(tmp_path / "own" / "1795000000.1", {"learning_rate": 0.9})
    _hparams_file(tmp_path / "named", {})
    _hparams_file(tmp_path / "named" / "trial_1", {"learning_rate": 0.9})
    reader = LogdirReader()
    runs = reader.load_logdir(tmp_path).runs
    assert runs["run"].hparams == {"learning_rate": 0.25, "optimizer": "sgd"}  # the latest child
    assert runs["run/1795000000.1234567"].hparams == {"learning_rate": 0.5, "optimizer": "sgd"}
    assert runs["own"].hparams == {"learning_rate": 0.1}  # its own session wins
    assert runs["named"].hparams == {}  # a child not named by a time is a run of its own
    shutil.rmtree(tmp_path / "run" / "1795000100.5")
    shutil.rmtree(tmp_path / "run" / "1795000000.1234567")
    assert reader.load_logdir(tmp_path).runs["run"].hparams == {}  # the cache was not changed


def test_a_corrupt_hparams_session_is_a_warning_and_the_rest_loads(tmp_path):
    from tensorboard.compat.proto import event_pb2, summary_pb2

    from tb_stability.reader import hparams

    meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(
        plugin_name="hparams", content=b"\xff\xff\xff not a proto"))
    with StabilityWriter(tmp_path / "run", wall_time=1.0) as writer:
        writer.write_event(event_pb2.Event(step=0, summary=summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=hparams.SESSION_START_TAG, metadata=meta)])))
        writer.write_scalar("loss", 0, 1.0)
    run = LogdirReader().load_logdir(tmp_path).runs["run"]
    assert run.hparams == {}
    assert len(run.warnings) == 1 and "could not decode the hparams session" in run.warnings[0]
    assert list(run.scalars["loss"].values) == [1.0]
