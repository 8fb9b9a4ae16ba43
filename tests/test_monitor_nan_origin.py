"""NaN origin in custom training loops (`StabilityMonitor`), from real training runs.

The monitor's ``observe`` runs after the update, so the weights before it are
copied inside the optimizer's ``apply`` (`instrumentation.monitor_nan`) and
paired with the batch ``observe`` is given. Each test trains a real
``tf.GradientTape`` loop, reads the event files back with the reader side and
checks what the forensics found, what they saved and what the report says.
"""

from __future__ import annotations

import json
import os
import textwrap
import warnings

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityMonitor  # noqa: E402
from instrumentation.nan_capture import NanCapture  # noqa: E402
from instrumentation.weight_copies import copied_values  # noqa: E402
from tb_stability import cli, schema  # noqa: E402
from tb_stability.analysis import analyze_logdir  # noqa: E402
from tests.test_instrumentation_support import column, read_events, step_rows  # noqa: E402

BATCH = 32
NAN_STEP = 9
NAN_ROW = 12

# In a file, so that `tb-stability replay --loss FILE.py:own_log_loss` can load it.
LOSS_SOURCE = textwrap.dedent('''
    import tensorflow as tf


    def own_log_loss(y, p):
        """A hand-written binary log loss: log(0) where p reaches 0 or 1."""
        return -tf.reduce_mean(y * tf.math.log(p) + (1 - y) * tf.math.log(1 - p))
''')
_namespace: dict = {}
exec(LOSS_SOURCE, _namespace)  # noqa: S102 - the same function the file defines
own_log_loss = _namespace["own_log_loss"]


def data(nan_row: bool):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16 * BATCH, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")[:, None]
    if nan_row:
        x[NAN_STEP * BATCH + NAN_ROW, 3] = np.nan
    return x, y


def build():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                             keras.layers.Dense(1, activation="sigmoid", name="out")])


def train(log_dir, x, y, *, loss=own_log_loss, monitor_kwargs=None, jit=False,
          observe_first=False, between=None, eager=False):
    """A README-style loop; ``between(step, model)`` runs on the host after each step.

    ``eager``: no ``tf.function``, numpy batches (a beginner's loop).
    """
    model = build()
    optimizer = keras.optimizers.Adam(1e-2)
    kwargs = dict(every=5, optimizer=optimizer, model=model, loss=loss, jit_compile=jit)
    kwargs.update(monitor_kwargs or {})
    monitor = StabilityMonitor(str(log_dir), **kwargs)

    def step(xb, yb):
        with tf.GradientTape() as tape:
            p = model(xb, training=True)
            value = own_log_loss(yb, p)
        grads = tape.gradient(value, model.trainable_variables)
        if observe_first:
            monitor.observe(value, grads, model.trainable_variables, inputs=xb, labels=yb)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        if not observe_first:
            monitor.observe(value, grads, model.trainable_variables,
                            inputs=xb, labels=yb, predictions=p)
        return value

    if not eager:
        step = tf.function(step, jit_compile=jit)
    with monitor:
        for i in range(len(x) // BATCH):
            step(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])
            monitor.tick()
            if between is not None:
                between(i, model)
    return model, monitor


def origin_records(log_dir) -> list:
    events = read_events(str(log_dir))
    return [json.loads(e.value.item()) for e in events.get((".", schema.TAG_NAN_ORIGIN), [])]


def nan_finding(log_dir) -> dict:
    report = analyze_logdir(str(log_dir))
    findings = [f for run in report.runs for f in run.findings if f.kind == "nan_inf"]
    assert len(findings) == 1, [f.kind for run in report.runs for f in run.findings]
    return findings[0]


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_a_nan_input_row_is_traced_to_its_row(tmp_path, mode):
    x, y = data(nan_row=True)
    train(tmp_path, x, y, jit=mode == "xla", eager=mode == "eager")
    records = origin_records(tmp_path)
    assert len(records) == 1
    record = records[0]
    assert (record["step"], record["origin"], record["source"]) == \
        (NAN_STEP, "inputs", "StabilityMonitor")
    assert [entry["rows"] for entry in record["nonfinite_rows"]] == [[NAN_ROW]]
    # The statistics agree on the step: its gradients are the first non-finite ones.
    rows = step_rows(read_events(str(tmp_path)))
    nonfinite = column(rows, "nonfinite_grads")
    assert np.flatnonzero(nonfinite > 0)[0] == NAN_STEP
    # The saved batch is that step's batch, the saved weights those before its update.
    saved = np.load(os.path.join(record["artifacts"], "batch.npz"))
    np.testing.assert_array_equal(saved["x_0"], x[NAN_STEP * BATCH:(NAN_STEP + 1) * BATCH])
    np.testing.assert_array_equal(saved["y_0"], y[NAN_STEP * BATCH:(NAN_STEP + 1) * BATCH])
    assert all(np.isfinite(saved[f"w_{i}"]).all() for i in range(4))
    finding = nan_finding(tmp_path)
    assert finding.first_step == NAN_STEP
    assert "row 12 of 32" in finding.explanation
    assert "np.isfinite(x)" in finding.remedy and "clipnorm" not in finding.remedy


def test_the_report_blamed_the_update_without_the_forensics(tmp_path):
    """The same run with ``nan_forensics=False``: why the capture matters."""
    x, y = data(nan_row=True)
    train(tmp_path, x, y, monitor_kwargs={"nan_forensics": False})
    assert origin_records(tmp_path) == []
    assert not os.path.exists(tmp_path / "nan_origin")
    assert "clipnorm" in nan_finding(tmp_path).remedy


def saturate_output(at_step):
    """Between steps, pushes the output bias so far that p == 1.0 in float32: log(1 - p)."""
    def between(step, model):
        if step == at_step:
            model.get_layer("out").bias.assign([60.0])
    return between


def test_a_log_of_zero_in_a_hand_written_loss_is_traced_to_the_loss(tmp_path):
    x, y = data(nan_row=False)
    train(tmp_path, x, y, between=saturate_output(5))
    records = origin_records(tmp_path)
    assert len(records) == 1
    record = records[0]
    assert (record["step"], record["origin"], record["layer"]) == (6, "loss", None)
    assert record["replay_with"] == "loss_fn" and record["loss_name"] == "own_log_loss"
    # The weights saved are those before step 6's update: finite, with the pushed bias
    # (every later step's update is NaN).
    saved = np.load(os.path.join(record["artifacts"], "batch.npz"))
    assert all(np.isfinite(saved[f"w_{i}"]).all() for i in range(4))
    np.testing.assert_array_equal(saved["w_3"], [60.0])
    # tb-stability replay needs the hand-written loss to re-run it; with it, the same origin.
    loss_file = tmp_path / "losses.py"
    loss_file.write_text(LOSS_SOURCE)
    assert cli.main(["replay", str(tmp_path), "--loss", f"{loss_file}:own_log_loss"]) == 0
    assert cli.main(["replay", str(tmp_path)]) == 1  # forward pass only: not reproduced
    assert cli.main(["replay", str(tmp_path), "--loss", f"{loss_file}:missing"]) == 2


def test_a_keras_loss_name_is_replayed_without_help(tmp_path, capsys):
    x, y = data(nan_row=False)
    train(tmp_path, x, y, loss="binary_crossentropy", between=saturate_output(5))
    record = origin_records(tmp_path)[0]
    assert record["loss_name"] == "binary_crossentropy"
    # Keras' crossentropy clips p, so the re-run with it finds no non-finite value: the
    # loop's own loss did (the recorded origin is the replay of the named loss).
    assert record["origin"] == "not_reproduced"
    capsys.readouterr()
    assert cli.main(["replay", str(tmp_path)]) == 0
    assert "origin=not_reproduced" in capsys.readouterr().out


def test_a_configured_keras_loss_is_replayed_with_its_config(tmp_path):
    """``from_logits=True`` must survive: its name alone would replay ``from_logits=False``."""
    from instrumentation import replay

    x, y = data(nan_row=True)
    train(tmp_path, x, y, loss=keras.losses.BinaryCrossentropy(from_logits=True, name="bce"))
    record = origin_records(tmp_path)[0]
    assert record["loss_name"] == "bce"
    loss = replay.load_loss(record, None)
    assert isinstance(loss, keras.losses.BinaryCrossentropy)
    assert loss.get_config()["from_logits"] is True


def test_a_healthy_run_captures_nothing(tmp_path):
    x, y = data(nan_row=False)
    model, monitor = train(tmp_path, x, y)
    assert origin_records(tmp_path) == []
    assert not os.path.exists(tmp_path / "nan_origin")
    assert int(monitor._nan.weights_at.numpy()) == -1
    assert int(monitor._nan.capture.step.numpy()) == -1


def test_without_a_model_the_batch_and_weights_are_still_saved(tmp_path):
    x, y = data(nan_row=True)
    train(tmp_path, x, y, monitor_kwargs={"model": None})
    record = origin_records(tmp_path)[0]
    assert (record["step"], record["origin"]) == (NAN_STEP, "not_reproduced")
    assert "model=" in record["reason"]
    saved = np.load(os.path.join(record["artifacts"], "batch.npz"))
    assert saved["x_0"].shape == (BATCH, 8) and not np.isfinite(saved["x_0"]).all()


@pytest.mark.parametrize("eager", [False, True], ids=["graph", "eager"])
def test_observe_before_the_update_captures_nothing(tmp_path, eager):
    """Weights copied in the apply after ``observe`` would be paired with the next batch."""
    x, y = data(nan_row=True)
    _, monitor = train(tmp_path, x, y, observe_first=True, eager=eager)
    assert origin_records(tmp_path) == []
    if eager:  # the apply copied the weights, but no observe paired them with a batch
        assert int(monitor._nan.capture.step.numpy()) == -1
    else:
        assert monitor._nan.weights_at is None
    rows = step_rows(read_events(str(tmp_path)))
    assert np.flatnonzero(column(rows, "nonfinite_grads") > 0)[0] == NAN_STEP


def test_a_failing_capture_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(NanCapture, "batch_copier", broken)
    x, y = data(nan_row=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, monitor = train(tmp_path, x, y)
    messages = [str(w.message) for w in caught if "NaN forensics disabled" in str(w.message)]
    assert len(messages) == 1 and "injected" in messages[0]
    assert monitor._nan.broken and not monitor._broken
    rows = step_rows(read_events(str(tmp_path)))
    assert len(rows) == len(x) // BATCH  # every step recorded
    assert origin_records(tmp_path) == []


def test_the_update_ratio_still_comes_from_the_update_tensors(tmp_path):
    """The capture's branch reads the weights before the update: not a write to them.

    Were it taken for one, the monitor would fall back to copying the weights
    before each log step; the copy taken before the first update would not
    hold the initial weights any more.
    """
    x, y = data(nan_row=False)
    model, monitor = train(tmp_path, x, y)
    initial = [v.numpy() for v in build().trainable_variables]
    copies = copied_values(monitor._stats.snapshots, len(model.trainable_variables))
    for held, first in zip(copies, initial):
        np.testing.assert_array_equal(held, first)
    assert not np.array_equal(model.trainable_variables[0].numpy(), initial[0])
