"""A GAN's two losses are not read as a loss that should fall.

A real GAN (a generator and a discriminator on 2-D data) logs its losses with
``tf.summary`` under the names people give them. Near equilibrium the
discriminator's loss rises to ``2 ln 2`` and the generator's settles: read as
"the" loss, that is a stall or a divergence, which it is not.
"""

from __future__ import annotations

import numpy as np
import pytest

from tb_stability.analysis import analyze_logdir
from tb_stability.detectors import _loss_tags, adversarial
from tb_stability.reader import load_logdir
from tb_stability.writer import StabilityWriter

LOSS_RULES = {"stalled", "divergence", "loss_spike", "final_step_spike", "oscillation"}


@pytest.mark.parametrize("tags,expected", [
    (("d_loss", "g_loss"), ("g_loss", "d_loss")),
    (("Loss_D", "Loss_G"), ("Loss_G", "Loss_D")),
    (("loss/generator", "loss/discriminator"), ("loss/generator", "loss/discriminator")),
    (("gen_loss", "critic_loss"), ("gen_loss", "critic_loss")),
    (("train/g_loss", "train/d_loss", "val/d_loss"), ("train/g_loss", "train/d_loss")),
    (("d_loss", "val_loss"), None),
    (("g_loss",), None),
    (("total_loss", "cls_loss"), None),
], ids=["d_g", "pytorch-dcgan", "grouped", "critic", "split-prefix", "d-only-with-val",
        "g-only", "detection-parts"])
def test_adversarial_pair_is_recognised_by_name(tmp_path, tags, expected):
    with StabilityWriter(str(tmp_path), wall_time=1.0) as writer:
        for tag in tags:
            for step in range(5):
                writer.write_scalar(tag, step, 1.0)
    run = load_logdir(tmp_path).runs["."]
    assert _loss_tags.adversarial_losses(run) == expected


def _train_gan(log_dir, names=("d_loss", "g_loss"), epochs=20, nan_at=None, g_lr=1e-3,
               d_lr=1e-3):
    """A small real GAN; logs its two losses every 4 steps; a NaN in the discriminator's
    loss from step ``nan_at`` on (as a log(0) would make)."""
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    real = (rng.standard_normal((2048, 2)) * [0.5, 2.0] + [3.0, -1.0]).astype("float32")
    gen = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="relu"),
                            keras.layers.Dense(2)])
    disc = keras.Sequential([keras.Input((2,)), keras.layers.Dense(32, activation="relu"),
                             keras.layers.Dense(1)])
    g_opt = keras.optimizers.Adam(g_lr, beta_1=0.5)
    d_opt = keras.optimizers.Adam(d_lr, beta_1=0.5)
    bce = keras.losses.BinaryCrossentropy(from_logits=True)

    @tf.function
    def step(batch):
        noise = tf.random.normal((tf.shape(batch)[0], 8))
        with tf.GradientTape() as d_tape, tf.GradientTape() as g_tape:
            fake = gen(noise, training=True)
            on_real, on_fake = disc(batch, training=True), disc(fake, training=True)
            d_loss = bce(tf.ones_like(on_real), on_real) + bce(tf.zeros_like(on_fake), on_fake)
            g_loss = bce(tf.ones_like(on_fake), on_fake)
        d_opt.apply_gradients(zip(d_tape.gradient(d_loss, disc.trainable_variables),
                                  disc.trainable_variables))
        g_opt.apply_gradients(zip(g_tape.gradient(g_loss, gen.trainable_variables),
                                  gen.trainable_variables))
        return d_loss, g_loss

    writer = tf.summary.create_file_writer(str(log_dir))
    count = 0
    with writer.as_default():
        for _ in range(epochs):
            for i in range(0, len(real), 32):
                d_loss, g_loss = step(real[i:i + 32])
                if nan_at is not None and count >= nan_at:
                    d_loss = float("nan")
                if count % 4 == 0:
                    tf.summary.scalar(names[0], d_loss, step=count)
                    tf.summary.scalar(names[1], g_loss, step=count)
                count += 1
    writer.flush()


@pytest.fixture(scope="module")
def healthy_gan(tmp_path_factory):
    root = tmp_path_factory.mktemp("gan")
    _train_gan(root / "gan", epochs=20)  # 1280 steps: read as the loss, d_loss "stalled"
    return root


def test_a_healthy_gan_gets_no_loss_curve_finding_and_says_why(healthy_gan):
    run = load_logdir(healthy_gan).runs["gan"]
    d_loss = run.scalars["d_loss"].values
    assert np.median(d_loss[-20:]) > np.median(d_loss[:20])  # it rises towards 2 ln 2
    (report,) = analyze_logdir(healthy_gan).runs
    assert not {f.kind for f in report.findings} & LOSS_RULES
    assert any("GAN's losses (g_loss, d_loss)" in w for w in report.warnings)


def test_a_nan_in_a_gan_loss_is_still_found(tmp_path):
    _train_gan(tmp_path / "gan", names=("Loss_D", "Loss_G"), epochs=3, nan_at=120)
    (report,) = analyze_logdir(tmp_path).runs
    nan = [f for f in report.findings if f.kind == "nan_inf"]
    assert nan and nan[0].first_step == 120


# ------------------------------------------------- the discriminator wins


def _curve(start, end, n=100, at=50, width=5.0, noise=0.0, seed=0):
    """``start`` turning into ``end`` around index ``at`` (a logistic step), with noise."""
    rng = np.random.default_rng(seed)
    turn = 1.0 / (1.0 + np.exp(-(np.arange(n) - at) / width))
    return start + (end - start) * turn + noise * rng.random(n)


@pytest.mark.parametrize("d,g,won", [
    (_curve(1.39, 0.01), _curve(0.69, 8.0), True),
    (_curve(0.69, 0.02), _curve(0.69, 4.0), True),  # mean instead of sum of the two BCEs
    (_curve(1.2, 1.38, noise=0.1), _curve(0.8, 0.7, noise=0.1), False),  # near equilibrium
    (_curve(1.39, 0.01), _curve(0.69, 0.8), False),  # d falls, g stays: g catches up
    (_curve(1.39, 1.3), _curve(0.69, 8.0), False),  # g climbs alone
    (_curve(1.39, 0.2), _curve(0.69, 8.0), False),  # d not near 0
    (_curve(1.39, 0.01), _curve(0.69, 1.6), False),  # g not high: 2x but below the floor
    (_curve(0.5, -2.0), _curve(0.1, 6.0), False),  # a signed critic loss (Wasserstein)
    (_curve(1.39, 0.01, n=9), _curve(0.69, 8.0, n=9), False),  # too few points
], ids=["bce-sum", "bce-mean", "equilibrium", "d-falls-g-flat", "g-climbs-alone",
        "d-not-near-zero", "g-below-floor", "wasserstein", "too-few-points"])
def test_discriminator_won_rule(d, g, won):
    result = adversarial.discriminator_won(d, g)
    assert (result is not None) == won
    if won:
        # the onset: where the discriminator's loss has fallen (around index 50)
        assert 50 <= result["onset_index"] <= 70
        np.testing.assert_allclose(result["d_final"], np.median(d[-10:]))
        np.testing.assert_allclose(result["g_start"], np.median(g[:3]))


def test_a_real_gan_whose_discriminator_wins_is_a_divergence(tmp_path):
    """A generator trained 1000x slower than its discriminator: the discriminator wins."""
    _train_gan(tmp_path / "gan", epochs=6, g_lr=1e-6, d_lr=3e-3)
    run = load_logdir(tmp_path).runs["gan"]
    d_loss, g_loss = run.scalars["d_loss"].values, run.scalars["g_loss"].values
    assert np.median(d_loss[-10:]) < 0.05 and np.median(g_loss[-10:]) > 3.0
    (report,) = analyze_logdir(tmp_path).runs
    (finding,) = [f for f in report.findings if f.kind == "divergence"]
    assert finding.severity == "warning"
    assert finding.evidence["discriminator_loss"] == "d_loss"
    assert finding.evidence["generator_loss"] == "g_loss"
    assert "The discriminator won" in finding.explanation
    assert "d_optimizer" in finding.remedy
    steps = run.scalars["d_loss"].steps
    assert steps[0] < finding.first_step < steps[-1] and finding.last_step == steps[-1]
    assert not {f.kind for f in report.findings} & (LOSS_RULES - {"divergence"})


def test_a_healthy_gan_is_not_a_discriminator_win(healthy_gan):
    run = load_logdir(healthy_gan).runs["gan"]
    assert adversarial.discriminator_won(run.scalars["d_loss"].values,
                                         run.scalars["g_loss"].values) is None
