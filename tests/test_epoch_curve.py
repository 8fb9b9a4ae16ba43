"""The per-epoch training loss: a steady rise and a frozen level (`detectors.epoch_curve`).

Hand-made series first, then real `model.fit` runs logged by Keras' own
TensorBoard callback at its default ``update_freq="epoch"``: Adam at 1.0
blows the model up inside its first epoch (invisible in per-epoch means) and
the collapsed model's loss then creeps up at every epoch; RMSprop at 1.0
kills every unit, and the loss then stays put to the 7th digit; Adam at 1e-3
is their healthy twin.
"""

import numpy as np
import pytest

from tb_stability.analysis import analyze_logdir
from tb_stability.detectors import epoch_curve

LEVEL = 1.0 + 0.002 * np.random.default_rng(0).standard_normal(20)
CREEP = np.r_[3.0, 2.0, 1.6561, 1.6561, 1.6622, 1.6651, 1.6668, 1.6677, 1.6683, 1.6687]


@pytest.mark.parametrize("values, rises", [
    pytest.param(CREEP, 6, id="collapsed-model-creeping-up"),
    pytest.param(np.r_[2.0, 1.5, 1.2, 1.0, 1.05, 1.1, 1.2, 1.3, 1.4, 1.5], 6, id="rising-after-a-minimum"),
    pytest.param(1.0 / np.arange(1, 21), None, id="healthy-decrease"),
    pytest.param(LEVEL, None, id="noise-about-a-level"),
    pytest.param(np.r_[2.0, 1.5, 1.2, 1.0, 1.01, 1.1, 1.2, 1.3, 1.4, 1.3], None, id="fell-at-the-last-epoch"),
    pytest.param(np.r_[2.0, 1.8, 1.6, 1.4, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5], None, id="five-rises-only"),
    pytest.param(1.0 + 1e-4 * np.arange(10), None, id="rise-below-half-a-percent"),
    pytest.param(np.r_[1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2], None, id="fewer-than-8-epochs"),
])
def test_steady_rise_against_hand_made_series(values, rises):
    got = epoch_curve.steady_rise(values)
    assert (got and got["rises"]) == rises, got


FROZEN = np.r_[4801.8, 2.1544, 1.7722, 1.7497, np.full(16, 1.7497) * (1 + 1e-7 * np.tile([1, -1], 8))]


@pytest.mark.parametrize("values, frozen", [
    pytest.param(FROZEN, True, id="dead-network-to-the-7th-digit"),
    pytest.param(np.r_[3.0, 2.0, np.full(8, 24.2058)], True, id="exactly-constant"),
    pytest.param(np.r_[3.0, 2.0, 1.0, 0.5, 0.2, np.full(5, 1e-7)], False, id="loss-driven-to-zero"),
    pytest.param(1.0 / np.arange(1, 21), False, id="healthy-decrease"),
    pytest.param(0.07 * (1 + 5e-4 * np.tile([1, -1], 10)), False, id="converged-but-moving"),
    pytest.param(np.r_[2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], False, id="fewer-than-8-epochs"),
])
def test_frozen_level_against_hand_made_series(values, frozen):
    got = epoch_curve.frozen_level(values)
    assert (got is not None) == frozen, got


def test_steady_rise_reports_the_start_and_the_first_epoch():
    got = epoch_curve.steady_rise(np.r_[40.0, CREEP[1:]])
    assert (got["start_index"], got["best_index"]) == (3, 2)  # a tie is not a rise
    assert got["relative_rise"] == pytest.approx(1.6687 / 1.6561 - 1)
    assert got["first_to_later"] == pytest.approx(40.0 / np.median(CREEP[1:]))


tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


def _fit(logdir, learning_rate, optimizer="adam", epochs=10):
    """A 2x128 ReLU classifier, Keras' TensorBoard callback at its defaults."""
    data = np.random.default_rng(0)
    x = data.normal(size=(4096, 20)).astype("float32")
    y = np.argmax(x @ data.normal(size=(20, 5)) + 0.5 * data.normal(size=(4096, 5)), 1)
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(128, activation="relu"),
                              keras.layers.Dense(128, activation="relu"), keras.layers.Dense(5)])
    opt = {"adam": keras.optimizers.Adam, "rmsprop": keras.optimizers.RMSprop}[optimizer]
    model.compile(opt(learning_rate), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0, validation_split=0.2,
              callbacks=[keras.callbacks.TensorBoard(str(logdir))])


def _findings(logdir):
    return [f for run in analyze_logdir(str(logdir)).runs for f in run.findings]


def test_adam_at_1_with_only_epoch_means_is_a_rising_loss(tmp_path):
    _fit(tmp_path, 1.0)
    findings = _findings(tmp_path)
    assert [(f.run, f.kind) for f in findings] == [("train", "divergence")], findings
    f = findings[0]
    assert f.severity == "warning"
    assert f.evidence["source"] == "scalar:epoch_loss"
    assert f.evidence["steady_rise_epochs"] >= epoch_curve.RISES
    assert f.evidence["first_epoch_to_later"] >= epoch_curve.FIRST_EPOCH
    assert f.evidence["learning_rate"] == 1.0
    assert "fresh initialisation" in f.remedy
    # Adam at 0.1 (a 10x cut) would still be 100x Adam's default: the default, said why.
    assert "keras.optimizers.Adam(learning_rate=0.001)  # Adam's default" in f.remedy
    assert "update_freq='batch'" in f.remedy


def test_the_healthy_twin_has_no_finding(tmp_path):
    _fit(tmp_path, 1e-3)
    assert _findings(tmp_path) == []


def test_rmsprop_at_1_kills_every_unit_and_is_a_stall(tmp_path):
    _fit(tmp_path, 1.0, "rmsprop", epochs=12)
    findings = _findings(tmp_path)
    assert [(f.run, f.kind) for f in findings] == [("train", "stalled")], findings
    f = findings[0]
    assert f.evidence["source"] == "scalar:epoch_loss"
    assert f.evidence["epoch_loss_relative_range"] <= epoch_curve.FLAT
    assert f.evidence["median_kernel_update_ratio"] is None
    assert "no longer move" in f.explanation
    assert "fresh initialisation" in f.remedy


def _write_epochs(logdir, losses, rates):
    writer = tf.summary.create_file_writer(str(logdir))
    with writer.as_default():
        for epoch, (loss, rate) in enumerate(zip(losses, rates)):
            tf.summary.scalar("epoch_loss", loss, step=epoch)
            tf.summary.scalar("epoch_learning_rate", rate, step=epoch)
    writer.close()


@pytest.mark.parametrize("last_rate, stalled", [
    pytest.param(0.1, True, id="constant-rate"),
    pytest.param(1e-4, False, id="rate-decayed-1000x"),
])
def test_a_frozen_loss_under_a_finished_schedule_is_not_a_stall(tmp_path, last_rate, stalled):
    losses = np.r_[3.0, 1.0, np.full(10, 0.5)]
    rates = np.geomspace(0.1, last_rate, losses.size)
    _write_epochs(tmp_path / "train", losses, rates)
    kinds = [f.kind for f in _findings(tmp_path)]
    assert kinds == (["stalled"] if stalled else []), kinds
