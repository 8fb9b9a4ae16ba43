"""Where loss spikes sit: a recurring phase, the same batch every epoch, small batches.

The causes `spikes` tells apart: a spike at the same position in every epoch
(`recurring_phase`, `same_batch_every_epoch`: one bad batch of unshuffled
data, or a tiny last batch), and spikes on batches less than half the usual
size (`small_batch_steps`).
"""

from __future__ import annotations

import numpy as np

from tb_stability import running_mean as RM
from tb_stability.detectors import _common as C
from tb_stability.detectors import _robust as R
from tb_stability.rundata import RunData

PHASE_MAX_PERIOD = 1000
PHASE_MIN_POINTS = 8
PHASE_RATIO = 3.0
PHASE_MIN_MULTIPLE_POINTS = 3
PHASE_SHARE_GAIN = 0.25


def recurring_phase(values, spike_idx, steps, max_period: int = PHASE_MAX_PERIOD,
                    min_points: int = PHASE_MIN_POINTS, ratio: float = PHASE_RATIO) -> int | None:
    """Smallest period P at whose phase all spikes sit and the loss is far noisier.

    The series is first laid on the grid of its logged ``steps`` (one point
    per ``spacing`` steps; points left out, e.g. `running_mean`'s undetermined
    epoch ends, are gaps), so P counts steps; where the steps lie on no grid,
    P counts points.

    It takes at least two spikes (runs of consecutive indices): one spike does
    not recur, and among the hundreds of candidate periods one phase of a
    heavy-tailed loss is ``ratio`` times noisier than the rest by chance (a
    single spike in Adam-at-1.0 per-batch losses was said to recur every 10
    steps).

    The absolute residual ``|x - rolling_median(x, 25)|`` is computed once; for
    each candidate period P (2..max_period) with every spike index congruent
    modulo P, the median residual at that phase (at least ``min_points``
    points) must be >= ``ratio`` times the median of all residuals. This is
    the signature of a tiny last batch in every epoch, or of one bad batch
    that comes back every epoch because the data is not shuffled.

    A period with fewer points at its phase (a few long epochs) holds when
    every one of them from the first spike on is a spike, at least
    `PHASE_MIN_MULTIPLE_POINTS` of them.

    Large spikes every 2P steps also pass at P (half of that phase's points
    are spikes), so a multiple kP (at least `PHASE_MIN_MULTIPLE_POINTS` points)
    replaces P when a larger share of its phase is that noisy
    (`PHASE_SHARE_GAIN` more).

    Returns:
      The period, or None.
    """
    x, spike_idx, unit = _on_step_grid(steps, np.asarray(values, dtype=np.float64),
                                       [int(i) for i in spike_idx])
    episodes = 1 + int(np.count_nonzero(np.diff(sorted(spike_idx)) > 1)) if spike_idx else 0
    if episodes < 2 or np.count_nonzero(np.isfinite(x)) < 2 * min_points:
        return None
    resid = np.abs(x - R.rolling_median(x, 25))
    overall = R.median(resid)
    if not overall > 0:
        return None
    phase0 = spike_idx[0]

    def congruent(p):
        return not any((i - phase0) % p for i in spike_idx)

    def phase(p):
        pts = resid[phase0 % p::p]
        return pts[np.isfinite(pts)]

    def share(p):
        return float(np.mean(phase(p) >= ratio * overall))

    flagged = set(spike_idx)

    def every_repetition(p):
        slots = [i for i in range(phase0, x.size, p) if np.isfinite(x[i])]
        return len(slots) >= PHASE_MIN_MULTIPLE_POINTS and flagged.issuperset(slots)

    for p in range(2, min(max_period, x.size // PHASE_MIN_MULTIPLE_POINTS) + 1):
        if not congruent(p):
            continue
        pts = phase(p)
        if (pts.size >= min_points and R.median(pts) >= ratio * overall) or (
                pts.size < min_points and every_repetition(p)):
            best = p
            for q in range(2 * p, min(max_period, x.size // PHASE_MIN_MULTIPLE_POINTS) + 1, p):
                if congruent(q) and share(q) >= share(best) + PHASE_SHARE_GAIN:
                    best = q
            return best * unit
    return None


MAX_GRID_GROWTH = 2  # a grid more than this many times the points is not a grid


def _on_step_grid(steps, values, spike_idx) -> tuple[np.ndarray, list[int], int]:
    """``values`` at their places on the grid of ``steps`` (NaN in the gaps), the
    spikes' grid indices and the grid's spacing; unchanged (spacing 1) when the
    steps lie on no grid."""
    steps = np.asarray(steps, dtype=np.int64)
    unit = RM.spacing(steps)
    offsets = steps - steps[0] if steps.size else steps
    if not steps.size or np.any(offsets % unit):
        return values, spike_idx, 1
    slots = offsets // unit
    if slots[-1] + 1 > MAX_GRID_GROWTH * steps.size:
        return values, spike_idx, 1
    grid = np.full(int(slots[-1]) + 1, np.nan)
    grid[slots] = values
    return grid, [int(slots[i]) for i in spike_idx], unit


def small_batch_steps(run: RunData, steps) -> list[int]:
    """Steps among ``steps`` whose logged batch size is < half the median."""
    bs = run.steps.get("batch_size")
    if bs is None or not len(bs):
        return []
    med = R.median(bs.values)
    out = []
    for st in steps:
        v = C.value_at(bs, int(st))
        if v is not None and med > 0 and v < 0.5 * med:
            out.append(int(st))
    return out


def same_batch_every_epoch(period, where) -> tuple[int, int] | None:
    """``(position, epoch_length)`` when the recurring spikes are one mid-epoch batch.

    None when there is no period, the epochs are unknown (``where`` None), or
    every spike is an epoch's last batch (the tiny-last-batch signature).
    """
    if period is None or where is None:
        return None
    position, length = where
    if not length.size or np.any(length <= 0):
        return None
    if np.all(position == length - 1):
        return None
    return int(position[0]), int(length[0])


def same_batch_remedy(same_batch, keras_log: bool = False) -> str:
    """The first remedy lines for one bad batch that recurs every epoch ("" otherwise).

    ``keras_log``: the positions count the points Keras' TensorBoard callback
    logged, one per call of its batch hook, which holds N batches under
    ``compile(steps_per_execution=N)``; a log cannot tell N.
    """
    if same_batch is None:
        return ""
    k = same_batch[0]
    return (
        f"Look at batch {k + 1} of the epoch (in unshuffled order, samples "
        f"{k} * batch_size to {k + 1} * batch_size - 1), fix or drop the bad samples, and "
        "shuffle every epoch so that no batch is always the same:\n"
        f"    bad = slice({k} * batch_size, {k + 1} * batch_size)\n"
        "    print(x[bad], y[bad])\n"
        "    model.fit(x, y, batch_size=batch_size, shuffle=True)  # tf.data: ds.shuffle(n).batch(b)\n"
        + (f"(Positions count the batches Keras' TensorBoard callback logged: under "
           f"compile(steps_per_execution=N) it logs once per N batches, so look at samples "
           f"{k} * N * batch_size to {k + 1} * N * batch_size - 1.)\n" if keras_log else "")
    )
