"""divergence of a GAN: the discriminator wins and the generator's loss climbs.

Signals: a GAN's two training losses logged as scalars, a generator's beside
a discriminator's or critic's (`_loss_tags.adversarial_losses`: ``g_loss`` and
``d_loss``, ``Loss_G`` and ``Loss_D``, ...). The loss rules read neither (the
players trade off by design); this rule reads both together.

Rule: each series needs >= ``MIN_POINTS`` (10) finite points, none negative
(a Wasserstein critic's loss is a signed distance, not a crossentropy: not
read). A series starts at the median of its first ``START_POINTS`` (3)
points, before the players had time to pull apart (a discriminator can win
within the first tenth of a run), and ends at the median of its last
``LEVEL_FRACTION`` (10 %, at least 3). The discriminator won when its final
level is <= ``D_FALL`` (0.1x) its start *and* <= ``D_FLOOR`` (0.1), while the
generator's final level is >= ``G_RISE`` (2x) its start and >= ``G_FLOOR``
(2.0, the crossentropy of a fake the discriminator scores at
``sigmoid(-1.8)``, 14 % real). Both sides must hold: a discriminator's loss that falls while the
generator's stays put is a generator catching up from a bad start, and a
generator's loss that climbs alone is not the discriminator winning. Onset:
the first step where the discriminator's trailing median of ``ONSET_WINDOW``
(5) points is <= twice its final level, or <= ``D_FALL`` x its first level
when that is higher. Severity: ``warning`` (training goes on, but the generator learns nothing
more). Non-finite values are left to `nonfinite`.
"""

from __future__ import annotations

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.detectors import _loss_tags
from tb_stability.detectors import _robust as R
from tb_stability.findings import Finding
from tb_stability.rundata import RunData

MIN_POINTS = 10
START_POINTS = 3
LEVEL_FRACTION = 0.1
D_FALL = 0.1
D_FLOOR = 0.1
G_RISE = 2.0
G_FLOOR = 2.0
ONSET_WINDOW = 5

REMEDY = (
    "Slow the discriminator down or give the generator a fairer game, one change at a time:\n"
    "    d_optimizer = keras.optimizers.Adam(1e-4, beta_1=0.5)  # a lower rate than the "
    "generator's\n"
    "    g_optimizer = keras.optimizers.Adam(2e-4, beta_1=0.5)\n"
    "    # one-sided label smoothing: real images are 0.9 'real', not 1.0\n"
    "    d_loss = bce(0.9 * tf.ones_like(real_out), real_out) + bce(tf.zeros_like(fake_out), "
    "fake_out)\n"
    "    # the non-saturating generator loss (not -bce(zeros, fake_out)):\n"
    "    g_loss = bce(tf.ones_like(fake_out), fake_out)\n"
    "Dropout or noise on the discriminator's inputs, and fewer discriminator steps per "
    "generator step, weaken it too; a Wasserstein loss with a gradient penalty keeps "
    "the generator's gradients informative however good the critic gets."
)


def _finite(series) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(series.values, dtype=np.float64)
    keep = np.isfinite(values)
    return np.asarray(series.steps)[keep], values[keep]


def discriminator_won(d_values, g_values) -> dict | None:
    """The rule of the module docstring on finite loss arrays; its numbers, or None."""
    d = np.asarray(d_values, dtype=np.float64)
    g = np.asarray(g_values, dtype=np.float64)
    if d.size < MIN_POINTS or g.size < MIN_POINTS or d.min() < 0 or g.min() < 0:
        return None
    d_start = float(np.median(d[:START_POINTS]))
    d_final = R.level(d, LEVEL_FRACTION, at_end=True)
    g_start = float(np.median(g[:START_POINTS]))
    g_final = R.level(g, LEVEL_FRACTION, at_end=True)
    if not (d_final <= D_FALL * d_start and d_final <= D_FLOOR):
        return None
    if not (g_final >= G_RISE * g_start and g_final >= G_FLOOR):
        return None
    trailing = R.rolling_median(d, ONSET_WINDOW)
    onset = R.first_index(trailing <= max(2.0 * d_final, D_FALL * d_start))
    return {"d_start": d_start, "d_final": d_final, "g_start": g_start, "g_final": g_final,
            "onset_index": 0 if onset is None else onset}


def detect(run: RunData) -> list[Finding]:
    """A GAN whose discriminator won (module docstring)."""
    pair = _loss_tags.adversarial_losses(run)
    if pair is None:
        return []
    g_tag, d_tag = pair
    g_steps, g = _finite(run.scalars[g_tag])
    d_steps, d = _finite(run.scalars[d_tag])
    won = discriminator_won(d, g)
    if won is None:
        return []
    onset = int(d_steps[won["onset_index"]])
    evidence = {
        "discriminator_loss": d_tag, "generator_loss": g_tag,
        "discriminator_loss_start": won["d_start"], "discriminator_loss_final": won["d_final"],
        "generator_loss_start": won["g_start"], "generator_loss_final": won["g_final"],
        "threshold": (f"discriminator final <= {D_FALL}x its start and <= {D_FLOOR}, generator "
                      f"final >= {G_RISE}x its start and >= {G_FLOOR} (medians of the first "
                      f"{START_POINTS} points and of the last {int(LEVEL_FRACTION * 100)}%)"),
    }
    return [Finding(
        kind="divergence", severity="warning", run=run.name,
        first_step=onset, last_step=int(max(d_steps[-1], g_steps[-1])),
        evidence=evidence,
        explanation=(
            f"The discriminator won: its loss ({d_tag}) fell from {C.fmt(won['d_start'])} to "
            f"{C.fmt(won['d_final'])} while the generator's ({g_tag}) climbed from "
            f"{C.fmt(won['g_start'])} to {C.fmt(won['g_final'])}. A discriminator that tells "
            "every fake apart leaves the generator nothing to learn from (its gradients "
            "saturate or point nowhere useful), so its samples stop improving, often "
            "collapsing to a few modes."
        ),
        remedy=REMEDY,
    )]
