"""A loss that leaves its range for many steps and comes back: one ``loss_spike``.

Real training: a small MLP trained by a `tf.GradientTape` loop that logs its
per-step loss, as a user's own loop does, where a stretch of consecutive
batches holds corrupted targets (a bad shard: 3x the scale; at 20x the model
does not recover within the run, and that is a divergence). Before, an
episode longer than three points that came back was reported by nothing.
"""

import numpy as np
import pytest

from tb_stability.analysis import analyze_logdir

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

STEPS = 600
SCALE = 3.0


def _train(logdir, bad_steps):
    data = np.random.default_rng(0)
    x = data.normal(size=(STEPS * 32, 20)).astype("float32")
    y = (x @ data.normal(size=(20, 1)) + 0.3 * data.normal(size=(len(x), 1))).astype("float32")
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(1)])
    opt = keras.optimizers.Adam(1e-3)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(xb) - yb) ** 2)
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                model.trainable_variables))
        return loss

    writer = tf.summary.create_file_writer(str(logdir))
    with writer.as_default():
        for i in range(STEPS):
            xb, yb = x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]
            if i in bad_steps:
                yb = SCALE * yb  # the corrupted shard
            tf.summary.scalar("train/loss", step(xb, yb), step=i)
    writer.close()


def test_a_stretch_of_bad_batches_is_one_loss_spike_with_its_length(tmp_path):
    bad = range(400, 412)
    _train(tmp_path, set(bad))
    findings = [f for run in analyze_logdir(str(tmp_path)).runs for f in run.findings]
    assert [f.kind for f in findings] == ["loss_spike"], findings
    f = findings[0]
    assert (f.first_step, f.evidence["count"]) == (bad[0], 1)
    assert f.last_step >= bad[-1] and f.evidence["longest_points"] == f.last_step - bad[0] + 1
    assert f"above its range (steps {bad[0]}-{f.last_step}" in f.explanation


def test_its_clean_twin_has_no_finding(tmp_path):
    _train(tmp_path, set())
    assert [f for run in analyze_logdir(str(tmp_path)).runs for f in run.findings] == []
