"""Ordinary Keras TensorBoard logs with ``update_freq="batch"``, from real fits.

Keras writes ``batch_loss`` as the epoch's running mean; the report reads the
per-batch losses recovered from it (`tb_stability.running_mean`). These tests
check the recovered values against the instrumentation's raw per-step loss of
the same fit, and the diagnoses on a bad batch that recurs every epoch, a
corrupted final batch, and their clean twins.
"""

import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402
from tb_stability.analysis import analyze_logdir, report_to_json  # noqa: E402
from tb_stability.detectors import _common as C  # noqa: E402
from tb_stability.reader import load_logdir  # noqa: E402

BATCH = 32


def _data(samples, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, 8)).astype("float32")
    y = (x[:, :3].sum(axis=1, keepdims=True) + 0.1 * rng.standard_normal((samples, 1))).astype("float32")
    return x, y


def _fit(logdir, x, y, epochs, *extra_callbacks):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="relu", name="hidden"),
                              keras.layers.Dense(1, name="out")])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
              callbacks=[keras.callbacks.TensorBoard(str(logdir), update_freq="batch"), *extra_callbacks])


def _findings(report, run="train"):
    return [f for r in report.runs if r.run == run for f in r.findings]


def test_recovered_losses_equal_the_instrumented_raw_losses_of_the_same_fit(tmp_path):
    x, y = _data(40 * BATCH + 7)  # 41 batches per epoch, the last of 7 samples
    _fit(tmp_path / "keras", x, y, 3, StabilityCallback(str(tmp_path / "stability"), every=1))
    keras_run = load_logdir(str(tmp_path / "keras")).runs["train"]
    raw = load_logdir(str(tmp_path / "stability")).runs["."].steps["loss"]
    series, source = C.loss_series(keras_run)
    assert source == C.PER_BATCH_SOURCE
    assert series.steps.tolist() == (raw.steps + 1).tolist()  # Keras counts batches from 1
    full = np.ones(len(raw), bool)
    full[40::41] = False  # each epoch's 7-sample batch: recovered as a lower bound only
    np.testing.assert_allclose(series.values[full], raw.values[full], rtol=2e-3)
    position, length = C.epoch_positions(keras_run, source, series.steps)
    assert (position == length - 1).nonzero()[0].tolist() == [40, 81, 122]


def test_bad_batch_every_epoch_is_named_and_clean_twin_is_quiet(tmp_path):
    x, y = _data(30 * BATCH)
    bad = y.copy()
    bad[12 * BATCH:13 * BATCH] = 300.0  # batch 13 of 30, every epoch (no shuffling)
    _fit(tmp_path / "bad", x, bad, 4, StabilityCallback(str(tmp_path / "instrumented")))
    _fit(tmp_path / "clean", x, y, 4)
    # The same fit, read from Keras' log and from the instrumentation's (steps from 0).
    for logdir, run, first, source in (("bad", "train", 43, C.PER_BATCH_SOURCE),
                                       ("instrumented", ".", 42, "stability/steps:loss")):
        report = analyze_logdir(str(tmp_path / logdir))
        spikes = [f for f in _findings(report, run) if f.kind == "loss_spike"]
        assert spikes, report_to_json(report)
        spike = spikes[0]
        # The first bad batch has too little history to be scored; it is left out of
        # the windows after it, so that it does not hide its repetitions.
        assert spike.severity == "warning" and spike.first_step == first
        assert spike.evidence["source"] == source and spike.evidence["count"] == 3
        assert (spike.evidence["recurring_period"], spike.evidence["batch_in_epoch"],
                spike.evidence["batches_per_epoch"]) == (30, 13, 30)
        assert "bad = slice(12 * batch_size, 13 * batch_size)" in spike.remedy
    clean = analyze_logdir(str(tmp_path / "clean"))
    assert [f for f in _findings(clean) if f.severity != "info"] == [], report_to_json(clean)


def test_corrupted_final_batch_is_a_final_step_spike(tmp_path):
    x, y = _data(30 * BATCH)
    y[-BATCH:] += 40.0
    _fit(tmp_path / "keras", x, y, 1)
    finals = [f for f in _findings(analyze_logdir(str(tmp_path / "keras"))) if f.kind == "final_step_spike"]
    assert finals and finals[0].first_step == 30, report_to_json(analyze_logdir(str(tmp_path / "keras")))
    assert "if that last batch was smaller than the others" in finals[0].explanation
    # Only epoch_loss (the old preference) has one point: nothing to see there.
    assert os.listdir(tmp_path / "keras") == ["train"]


def test_validation_run_is_not_read_as_a_training_loss(tmp_path):
    x, y = _data(20 * BATCH)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(1e-9), loss="mse")  # nothing moves
    model.fit(x, y, batch_size=BATCH, epochs=9, validation_split=0.25, verbose=0,
              callbacks=[keras.callbacks.TensorBoard(str(tmp_path))])
    report = analyze_logdir(str(tmp_path))
    assert {f.kind for f in _findings(report, "train")} == {"stalled"}, report_to_json(report)
    assert _findings(report, "validation") == [], report_to_json(report)


def test_plugin_serves_the_recovered_losses_the_findings_were_computed_on(tmp_path):
    from tests.test_plugin import get_json, make_client

    x, y = _data(30 * BATCH)
    y[-BATCH:] += 40.0
    _fit(tmp_path / "keras", x, y, 2)
    client = make_client(str(tmp_path / "keras"))
    runs = {r["run"]: r for r in get_json(client, "/runs")["runs"]}
    assert runs["train"]["series"]["per_batch"] == ["batch_loss"]
    series = get_json(client, "/series", run="train", tag="batch_loss", source="per_batch")
    running = get_json(client, "/series", run="train", tag="batch_loss", source="scalars")
    assert series["source"] == "per_batch" and series["steps"] == list(range(1, 61))
    finding = [f for f in get_json(client, "/findings", run="train")["runs"][0]["findings"]
               if f["kind"] == "final_step_spike"][0]
    assert finding["evidence"]["last_points"][-1]["loss"] == pytest.approx(series["values"][-1])
    assert series["values"][-1] > 10 * running["values"][-1] / 2  # the running mean hides it
    get_json(client, "/series", 404, run="train", tag="epoch_loss", source="per_batch")
    get_json(client, "/series", 400, run="train", tag="batch_loss", source="average")


def _model(steps_per_execution=1):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="relu", name="hidden"),
                              keras.layers.Dense(1, name="out")])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", steps_per_execution=steps_per_execution)
    return model


def test_a_second_fit_of_the_same_model_is_read_after_the_first(tmp_path):
    # Keras' batch counter restarts at every fit while the epochs go on: the
    # second fit's batches replace the first's, and are placed on its epochs.
    x, y = _data(30 * BATCH)
    bad = y.copy()
    bad[12 * BATCH:13 * BATCH] = 300.0
    model = _model()
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
              callbacks=[keras.callbacks.TensorBoard(str(tmp_path), update_freq="batch")])
    model.fit(x, bad, batch_size=BATCH, epochs=6, initial_epoch=2, shuffle=False, verbose=0,
              callbacks=[keras.callbacks.TensorBoard(str(tmp_path), update_freq="batch")])
    run = load_logdir(str(tmp_path)).runs["train"]
    assert [w for w in run.warnings if "60 point(s) from step 1 on were left out" in w], run.warnings
    series, source = C.loss_series(run)
    assert source == C.PER_BATCH_SOURCE and series.steps.tolist() == list(range(1, 121))
    assert np.argsort(series.values)[-4:].tolist() == sorted([12, 42, 72, 102], key=lambda i: series.values[i])
    report = analyze_logdir(str(tmp_path))
    spikes = [f for f in _findings(report) if f.kind == "loss_spike"]
    assert spikes and (spikes[0].evidence["batch_in_epoch"], spikes[0].evidence["batches_per_epoch"]) == (13, 30)


def test_a_rerun_into_the_same_logdir_reads_only_the_rerun(tmp_path):
    x, y = _data(30 * BATCH)
    bad = y.copy()
    bad[12 * BATCH:13 * BATCH] = 300.0
    for labels, epochs in ((bad, 4), (y, 3)):  # the notebook cell, fixed and run again
        _model().fit(x, labels, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
                     callbacks=[keras.callbacks.TensorBoard(str(tmp_path), update_freq="batch")])
    report = analyze_logdir(str(tmp_path))
    assert [f for f in _findings(report) if f.severity != "info"] == [], report_to_json(report)
    assert C.loss_series(load_logdir(str(tmp_path)).runs["train"])[0].steps.tolist() == list(range(1, 91))


def test_bad_batch_under_steps_per_execution_and_what_it_causes(tmp_path):
    x, y = _data(30 * BATCH)
    y[12 * BATCH:13 * BATCH] = 300.0  # batch 13: in the 5th call of the batch hook (batches 13-15)
    _model(steps_per_execution=3).fit(
        x, y, batch_size=BATCH, epochs=5, shuffle=False, verbose=0,
        callbacks=[keras.callbacks.TensorBoard(str(tmp_path), update_freq="batch")])
    report = analyze_logdir(str(tmp_path))
    findings = _findings(report)
    spike = [f for f in findings if f.kind == "loss_spike"][0]
    assert (spike.evidence["batch_in_epoch"], spike.evidence["batches_per_epoch"]) == (5, 10)
    assert "steps_per_execution=N" in spike.remedy and "4 * N * batch_size" in spike.remedy
    # What the bad batch does to the others' loss is its consequence, not a cause.
    others = [f for f in findings if f is not spike]
    assert others
    assert all(f.severity == "info" and f.evidence.get("consequence_of") == "loss_spike"
               for f in others), report_to_json(report)


def test_bad_batch_before_a_smaller_last_batch_is_not_a_final_step_spike(tmp_path):
    # 29 batches per epoch, the last of 7 samples. The bad batch raises the running
    # mean; the last batch, weighted less, lowers it by less than a full batch
    # would, so the recovered value of a small last batch is all but a spike.
    x, y = _data(28 * BATCH + 7)
    y[12 * BATCH:13 * BATCH] = 300.0
    _fit(tmp_path / "keras", x, y, 5, StabilityCallback(str(tmp_path / "stability"), every=1))
    run = load_logdir(str(tmp_path / "keras")).runs["train"]
    raw = load_logdir(str(tmp_path / "stability")).runs["."].steps["loss"]
    series, source = C.loss_series(run)
    assert source == C.PER_BATCH_SOURCE
    # Each epoch's end says nothing about its batch and is left out; the rest are
    # exact up to the float32 running mean (~3000 after the bad batch: its spacing,
    # 2.4e-4, times up to 29 batches).
    assert series.steps.tolist() == [s for s in range(1, 146) if s % 29]
    np.testing.assert_allclose(series.values, raw.values[series.steps - 1], rtol=2e-3, atol=0.03)
    report = analyze_logdir(str(tmp_path / "keras"))
    findings = _findings(report)
    assert not [f for f in findings if f.kind == "final_step_spike"], report_to_json(report)
    spike = [f for f in findings if f.kind == "loss_spike"][0]
    assert (spike.evidence["recurring_period"], spike.evidence["batch_in_epoch"],
            spike.evidence["batches_per_epoch"]) == (29, 13, 29), report_to_json(report)
    assert all(f.severity == "info" and f.evidence.get("consequence_of") == "loss_spike"
               for f in findings if f is not spike), report_to_json(report)


def test_integer_update_freq_that_does_not_divide_the_epoch(tmp_path):
    # update_freq=5 with 29 batches per epoch: Keras logs batches 5, 10, ... and
    # writes epoch_loss only for the epochs that end on a logged batch (epoch 4
    # ends at batch 145). Each point is the mean of the batches since the point
    # before it in its epoch.
    x, y = _data(29 * BATCH)
    keras.utils.set_random_seed(0)
    model = _model()
    model.fit(x, y, batch_size=BATCH, epochs=6, shuffle=False, verbose=0,
              callbacks=[keras.callbacks.TensorBoard(str(tmp_path / "keras"), update_freq=5),
                         StabilityCallback(str(tmp_path / "stability"), every=1)])
    run = load_logdir(str(tmp_path / "keras")).runs["train"]
    raw = load_logdir(str(tmp_path / "stability")).runs["."].steps["loss"].values
    assert 0 < len(run.scalars["epoch_loss"]) < 6
    series, source = C.loss_series(run)
    assert source == C.PER_BATCH_SOURCE
    assert series.steps.tolist() == list(range(5, 175, 5))
    want = []
    for step in series.steps:
        since = max(step - 5, (step - 1) // 29 * 29)  # the point before, or the epoch's start
        want.append(raw[since:step].mean())
    np.testing.assert_allclose(series.values, want, rtol=2e-3)
    position, length = C.epoch_positions(run, source, [29, 30, 145, 146])
    assert position.tolist() == [28, 0, 28, 0] and length.tolist() == [29] * 4


def test_outliers_in_the_last_small_batch_of_every_epoch_are_not_called_noise(tmp_path):
    # The last 5 samples (a 5-sample last batch, unshuffled) have wrong labels:
    # their spikes recur at every epoch's end, as a tiny last batch's noise
    # does, but hundreds of times the median, and the saved weights take the last one.
    x, y = _data(29 * BATCH + 5)
    y[-5:] = 200.0
    _fit(tmp_path, x, y, 5)
    report = analyze_logdir(str(tmp_path))
    by_kind = {f.kind: f for f in _findings(report)}
    assert by_kind["final_step_spike"].severity == "critical", report_to_json(report)
    assert by_kind["loss_spike"].severity == "warning"
    for finding in (by_kind["final_step_spike"], by_kind["loss_spike"]):
        assert finding.evidence["recurring_period"] == 30
        assert "far more than a smaller batch's noise" in finding.explanation
