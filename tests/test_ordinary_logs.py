"""Ordinary TensorBoard logs (no instrumentation) get the loss-based diagnoses.

Logs come from real training: `keras.callbacks.TensorBoard` and plain
`tf.summary.scalar` in a `tf.GradientTape` loop.
"""

import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from tb_stability.analysis import analyze_logdir, report_to_json  # noqa: E402
from tb_stability import cli  # noqa: E402


def _kinds(report, run):
    return {f.kind for r in report.runs if r.run == run for f in r.findings}


def _regression(seed=0, samples=256, features=8):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, features)).astype("float32")
    w = rng.standard_normal((features, 1)).astype("float32")
    y = x @ w + 0.1 * rng.standard_normal((samples, 1)).astype("float32")
    return x, y


def test_keras_tensorboard_callback_overfitting_is_flagged(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 20)).astype("float32")
    y = ((x @ rng.standard_normal((20, 1)) + 2.0 * rng.standard_normal((120, 1))) > 0).astype("float32")
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    logdir = tmp_path / "keras"
    model.fit(x, y, epochs=60, batch_size=32, validation_split=0.3, verbose=0,
              callbacks=[keras.callbacks.TensorBoard(str(logdir))])
    report = analyze_logdir(str(logdir))
    assert {r.run for r in report.runs} == {"train", "validation"}
    overfit = [f for r in report.runs for f in r.findings if f.kind == "overfitting"]
    assert overfit, report_to_json(report)
    assert overfit[0].first_step is not None and overfit[0].first_step < 60
    assert not any(f.severity == "critical" for r in report.runs for f in r.findings)


@pytest.mark.parametrize("update_freq", ["epoch", "batch"])
def test_keras_callback_nan_is_placed_in_the_unit_each_run_counts(update_freq, tmp_path):
    """Epoch scalars count epochs; the validation run's evaluation_*_vs_iterations count steps."""
    keras.utils.set_random_seed(0)
    x, y = _regression(samples=320)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.5), "mse")
    logdir = tmp_path / "keras"
    model.fit(x, y * 1e3, epochs=3, batch_size=32, validation_split=0.2, verbose=0,
              callbacks=[keras.callbacks.TensorBoard(str(logdir), update_freq=update_freq)])
    report = analyze_logdir(str(logdir))
    found = {r.run: f for r in report.runs for f in r.findings if f.kind == "nan_inf"}
    assert set(found) == {"train", "validation"}, report_to_json(report)
    steps_per_epoch = 256 // 32
    # The validation losses are logged at the iteration each epoch ends: never at step 0.
    val = found["validation"]
    assert val.first_step == steps_per_epoch and f"at step {steps_per_epoch}" in val.explanation
    assert all("evaluation_" in s for s in val.evidence["signals_at_onset"])
    train = found["train"]
    if update_freq == "epoch":
        assert train.first_step == 0 and "at epoch 0" in train.explanation
    else:
        assert 0 < train.first_step < steps_per_epoch
        assert f"at step {train.first_step}" in train.explanation


def _tape_loop(logdir, learning_rate, steps, corrupt_last=False, seed=0, tag="loss"):
    """Plain GradientTape linear regression logging ``tag`` with tf.summary.scalar."""
    x, y = _regression(seed)
    w = tf.Variable(tf.zeros((x.shape[1], 1)))
    writer = tf.summary.create_file_writer(str(logdir))
    rng = np.random.default_rng(seed)
    with writer.as_default():
        for step in range(steps):
            idx = rng.integers(0, x.shape[0], 32)
            xb, yb = x[idx], y[idx]
            if corrupt_last and step == steps - 1:
                yb = yb + 50.0
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((tf.matmul(xb, w) - yb) ** 2)
            w.assign_sub(learning_rate * tape.gradient(loss, w))
            tf.summary.scalar(tag, loss, step=step)
    writer.close()


def test_plain_tf_summary_divergence_is_flagged(tmp_path):
    _tape_loop(tmp_path / "diverge", learning_rate=1.3, steps=60)
    report = analyze_logdir(str(tmp_path / "diverge"))
    assert "divergence" in _kinds(report, "."), report_to_json(report)


def test_plain_tf_summary_final_step_spike_is_flagged_and_healthy_twin_is_clean(tmp_path):
    _tape_loop(tmp_path / "spike", learning_rate=0.05, steps=300, corrupt_last=True)
    _tape_loop(tmp_path / "clean", learning_rate=0.05, steps=300)
    spike = analyze_logdir(str(tmp_path / "spike"))
    finals = [f for r in spike.runs for f in r.findings if f.kind == "final_step_spike"]
    assert finals and finals[0].first_step == 299, report_to_json(spike)
    clean = analyze_logdir(str(tmp_path / "clean"))
    assert not [f for r in clean.runs for f in r.findings if f.severity in ("critical", "warning")], (
        report_to_json(clean))


def test_plain_tf_summary_loss_tagged_as_a_chart_group_is_read(tmp_path):
    _tape_loop(tmp_path / "spike", learning_rate=0.05, steps=300, corrupt_last=True, tag="Loss/train")
    report = analyze_logdir(str(tmp_path / "spike"))
    finals = [f for r in report.runs for f in r.findings if f.kind == "final_step_spike"]
    assert finals and finals[0].first_step == 299, report_to_json(report)
    assert finals[0].evidence["source"] == "scalar:Loss/train"


def test_plain_tf_summary_stalled_is_flagged(tmp_path):
    _tape_loop(tmp_path / "stalled", learning_rate=1e-7, steps=300)
    report = analyze_logdir(str(tmp_path / "stalled"))
    assert "stalled" in _kinds(report, "."), report_to_json(report)


def test_cli_reports_ordinary_logs(tmp_path, capsys):
    _tape_loop(tmp_path / "logs" / "diverge", learning_rate=1.3, steps=60)
    code = cli.main(["report", str(tmp_path / "logs"), "--format", "json"])
    out = capsys.readouterr().out
    assert '"divergence"' in out
    assert code in (0, 1)
    assert os.path.isdir(tmp_path / "logs" / "diverge")


def test_a_run_without_a_loss_says_the_loss_rules_read_nothing(tmp_path):
    _tape_loop(tmp_path / "objective", learning_rate=0.05, steps=300, tag="objective")
    _tape_loop(tmp_path / "loss", learning_rate=1.3, steps=60, tag="train/loss")
    report = analyze_logdir(str(tmp_path))
    by_run = {r.run: r for r in report.runs}
    assert by_run["objective"].findings == []
    assert [w for w in by_run["objective"].warnings if w.startswith("no loss among this run's scalars "
                                                                     "(objective)")], report_to_json(report)
    assert by_run["loss"].warnings == [] and "divergence" in _kinds(report, "loss")
