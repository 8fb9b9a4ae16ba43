"""Mixed precision (loss-scale skips) and replica decoding in the nan_inf detector.

Real training: ``mixed_float16`` fits with a LossScaleOptimizer; a two-replica
MirroredStrategy run in a subprocess (logical CPUs must be set before
TensorFlow initialises). Replica bit masks are also checked on written data.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tb_stability import schema
from tb_stability.analysis import analyze_run
from tb_stability.detectors.nonfinite import decode_replicas
from tb_stability.reader import load_logdir
from tb_stability.writer import StabilityWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fit_mixed(log_dir, x, y, loss, initial_scale, final_activation=None):
    keras = pytest.importorskip("keras")
    from instrumentation import StabilityCallback

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        init = keras.initializers.GlorotUniform(seed=1)
        model = keras.Sequential([
            keras.Input((4,)), keras.layers.Dense(8, activation="tanh", kernel_initializer=init),
            keras.layers.Dense(1, activation=final_activation, kernel_initializer="ones",
                               dtype="mixed_float16"),
        ])
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05),
                                                        initial_scale=initial_scale)
        model.compile(optimizer, loss)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                  callbacks=[StabilityCallback(str(log_dir), every=4)])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return load_logdir(log_dir).runs["."]


def test_high_initial_scale_skips_a_few_steps_then_recovers_without_critical(tmp_path):
    rng = np.random.RandomState(0)
    x = rng.randn(16 * 8, 4).astype("float32")
    y = (x @ rng.randn(4, 1)).astype("float32")
    run = _fit_mixed(tmp_path, x, y, "mse", initial_scale=2.0 ** 20)
    skipped = run.steps["skipped"].values
    assert skipped[0] == 1 and 0 < skipped.sum() < 10 and skipped[-4:].sum() == 0  # recovered
    assert np.isfinite(run.steps["loss"].values).all()
    assert not np.isfinite(run.steps["grad_norm"].values[skipped == 1]).all()
    findings = analyze_run(run)
    assert not [f for f in findings if f.severity == "critical"], findings
    (info,) = [f for f in findings if f.kind == "nan_inf"]
    assert info.severity == "info"
    assert info.evidence["skipped_steps"] == int(skipped.sum())
    assert info.evidence["loss_scale_min"] == run.steps["loss_scale"].values.min()
    assert "normal dynamic loss scaling" in info.explanation
    # Without the `skipped` column the same overflowed steps would be a critical nan_inf.
    del run.steps["skipped"]
    assert [f for f in analyze_run(run) if f.kind == "nan_inf"][0].severity == "critical"


def test_log_zero_loss_under_mixed_precision_is_nan_inf(tmp_path):
    tf = pytest.importorskip("tensorflow")
    rng = np.random.RandomState(1)
    x = (0.1 * rng.randn(8 * 8, 4)).astype("float32")
    y = np.ones((8 * 8, 1), "float32")
    y[3 * 8:4 * 8] = 0.0  # step 3: a label weight of 0 makes the log argument exactly 0

    def neg_log(y_true, p):
        return -tf.reduce_mean(tf.math.log(tf.cast(p, tf.float32) * y_true))

    run = _fit_mixed(tmp_path, x, y, neg_log, initial_scale=2.0 ** 4, final_activation="sigmoid")
    assert not np.isfinite(run.steps["loss"].values[3])
    (finding,) = [f for f in analyze_run(run) if f.kind == "nan_inf"]
    assert finding.severity == "critical" and finding.first_step == 3
    assert "steps:loss" in finding.evidence["signals_at_onset"]
    assert finding.evidence["loss_scale_skips"]["benign_skipped_steps"] == 0
    assert "loss computation" in finding.explanation


def _write(run_dir, columns, rows):
    with StabilityWriter(run_dir) as writer:
        writer.write_steps(np.asarray(rows, np.float64), columns)
    return load_logdir(run_dir).runs["."]


def test_persistent_skipping_and_scale_floor_become_nan_inf(tmp_path):
    columns = tuple(schema.STEP_COLUMNS) + ("skipped", "loss_scale")
    n = 30
    rows = [[s, 1.0, np.inf if s >= 5 else 1.0, 3.0 if s >= 5 else 0.0, 0.1,
             1.0 if s >= 5 else 0.0, 2.0 ** max(15 - s, -20)] for s in range(n)]
    run = _write(tmp_path / "persistent", columns, rows)
    (finding,) = [f for f in analyze_run(run) if f.kind == "nan_inf"]
    assert finding.severity == "critical" and finding.first_step == 5
    assert "steps:skipped" in finding.evidence["signals_at_onset"]
    assert "kept skipping" in finding.explanation
    # 4 skips in a row (not persistent) but the scale is already at 1: real overflow.
    rows = [[s, 1.0, np.inf if s in (6, 7) else 1.0, 0.0, 0.1, float(s in (6, 7)), 1.0]
            for s in range(10)]
    (finding,) = [f for f in analyze_run(_write(tmp_path / "floor", columns, rows))
                  if f.kind == "nan_inf"]
    assert finding.severity == "critical" and finding.first_step == 6


def test_replica_mask_is_decoded_on_written_data(tmp_path):
    assert decode_replicas(0) == [] and decode_replicas(float("nan")) == []
    assert decode_replicas(2.0) == [1] and decode_replicas(2.0 ** 40 + 5) == [0, 2, 40]
    columns = tuple(schema.STEP_COLUMNS) + ("nonfinite_replicas",)
    rows = [[0, 1.0, 1.0, 0, 0.1, 0], [1, 1.0, np.nan, 4, 0.1, 2], [2, np.nan, np.nan, 9, 0.1, 3]]
    (finding,) = [f for f in analyze_run(_write(tmp_path, columns, rows)) if f.kind == "nan_inf"]
    assert finding.evidence["first_nonfinite_replicas"] == [1]
    assert finding.evidence["nonfinite_replicas_at_onset"] == [1]
    assert "Replica 1 went non-finite first (step 1)" in finding.explanation


MIRRORED = r"""
import sys, numpy as np
sys.path.insert(0, {repo!r})
from examples.mirrored import split_cpu, make_model, data
split_cpu(2)
import keras, tensorflow as tf
from instrumentation import StabilityCallback
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
half, steps = 8, 4
x1, y1 = data(steps)
x1, y1 = x1[: steps * half], y1[: steps * half]
# every global batch = [shard, shard]: both replicas see identical data
x = np.concatenate([np.concatenate([x1[s*half:(s+1)*half]] * 2) for s in range(steps)])
y = np.concatenate([np.concatenate([y1[s*half:(s+1)*half]] * 2) for s in range(steps)])
with strategy.scope():
    model = make_model(keras)
    model.compile(keras.optimizers.SGD(0.05), "mse")
model.fit(x, y, batch_size=2 * half, epochs=1, shuffle=False, verbose=0,
          callbacks=[StabilityCallback({logdir!r} + "/identical", every=2)])
ref = make_model(keras); opt = keras.optimizers.SGD(0.05); norms = []
for s in range(steps):
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y1[s*half:(s+1)*half], ref(x1[s*half:(s+1)*half]))
    grads = tape.gradient(loss, ref.trainable_variables)
    norms.append(np.sqrt(sum(float(np.sum(np.square(np.asarray(g, np.float64)))) for g in grads)))
    opt.apply_gradients(zip(grads, ref.trainable_variables))
np.save({logdir!r} + "/reference.npy", np.asarray(norms))
x, y = data(steps, nan_replica=1)
with strategy.scope():
    model = make_model(keras)
    model.compile(keras.optimizers.SGD(0.05), "mse")
model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
          callbacks=[StabilityCallback({logdir!r} + "/nan_replica", every=2, nan_forensics=False)])
"""


def test_mirrored_identical_shards_match_single_device_and_replica_is_named(tmp_path):
    pytest.importorskip("tensorflow")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    code = MIRRORED.format(repo=REPO, logdir=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = load_logdir(tmp_path).runs
    reference = np.load(tmp_path / "reference.npy")
    np.testing.assert_allclose(runs["identical"].steps["grad_norm"].values, reference, rtol=1e-5)
    (finding,) = [f for f in analyze_run(runs["nan_replica"]) if f.kind == "nan_inf"]
    assert finding.first_step == 2 and finding.evidence["first_nonfinite_replicas"] == [1]
    assert "Replica 1 went non-finite first (step 2)" in finding.explanation
