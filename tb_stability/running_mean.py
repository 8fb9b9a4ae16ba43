"""Per-batch values recovered from Keras' running-mean batch scalars.

Keras' TensorBoard callback with ``update_freq="batch"`` (or an integer)
writes ``batch_loss``: not the batch's loss but the running mean of the
epoch so far (the loss tracker, weighted by batch size, reset every epoch).
That series hides what the diagnoses look for. A spike at the k-th batch of
an epoch moves it by only 1/k of its size, and a final-step spike on a small
last batch by even less, so the detectors used to prefer ``epoch_loss``
(one point per epoch) and could not see a bad batch at all.

The per-batch values come back exactly by de-averaging. With ``m_k`` the
running mean after the k-th batch of an epoch (all batches the same size),
the k-th batch's loss is ``k m_k - (k-1) m_{k-1}``; when only every N-th
batch is logged, the same difference over the window gives the mean loss of
the N batches in it. That needs the epochs' boundaries, and those come from
``epoch_loss``: Keras writes the tracker's final value there, so each
epoch's last logged batch holds exactly (float32) the epoch's value. An
epoch boundary that cannot be placed that way leaves the series unrecovered
(`per_batch` returns None) rather than guessed.

Limits, stated where the values are used:

* A batch smaller than the others (an epoch's remainder) is weighted less in
  the running mean, so its recovered deviation from the mean before it is
  ``b/B`` of the true one at most: a lower bound in size, same sign.
* The running mean is float32, so a recovered value carries an error of about
  ``k * 1e-7`` of the loss at the k-th batch of an epoch (1e-3 after 10,000
  batches).
"""

from __future__ import annotations

import numpy as np

from tb_stability.rundata import RunData, Series

# Running-mean batch tags whose per-batch values `per_batch` recovers, with
# the epoch tag whose values mark where each epoch ended.
EPOCH_TAG_OF = {"batch_loss": "epoch_loss"}


def _same(a: np.ndarray, b: float) -> np.ndarray:
    """``a == b`` in float32, NaN equal to NaN (a run that went NaN ends on one)."""
    a32 = np.asarray(a, dtype=np.float32)
    b32 = np.float32(b)
    if np.isnan(b32):
        return np.isnan(a32)
    return a32 == b32


def epoch_end_indices(steps, values, epoch_values) -> list[int] | None:
    """Indices of the batch series where each logged epoch ended.

    Epoch ``e``'s end is the logged batch whose running mean equals
    ``epoch_values[e]``: first the batch one epoch length after the previous
    end (the length learned from the first epoch), then, for the last epoch
    (which may stop early), the last logged batch, then the first equal value
    after the previous end.

    Args:
      steps: Batch steps (a batch counter), increasing.
      values: The running means logged at those steps.
      epoch_values: One value per epoch, in order.

    Returns:
      One index per epoch, strictly increasing; None when an epoch has no
      logged batch equal to its value.
    """
    steps = np.asarray(steps, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    n = steps.size
    ends: list[int] = []
    period = None
    prev_step = None
    for e, target in enumerate(np.asarray(epoch_values, dtype=np.float64)):
        lo = ends[-1] + 1 if ends else 0
        if lo >= n:
            return None
        end = None
        if period is not None:
            i = int(np.searchsorted(steps, prev_step + period))
            if i < n and steps[i] == prev_step + period and _same(values[i:i + 1], target)[0]:
                end = i
        if end is None and e == len(epoch_values) - 1 and _same(values[n - 1:], target)[0]:
            end = n - 1
        if end is None:
            hits = np.flatnonzero(_same(values[lo:], target))
            if not hits.size:
                return None
            end = lo + int(hits[0])
        if period is None:
            period = int(steps[end] - first_start(steps))
        prev_step = int(steps[end])
        ends.append(end)
    return ends


def spacing(steps: np.ndarray) -> int:
    """Batches between two logged points: 1 for ``update_freq="batch"``."""
    if steps.size < 2:
        return 1
    return max(1, int(np.min(np.diff(steps))))


def first_start(steps: np.ndarray) -> int:
    """The batch count before the first epoch: one spacing before the first step
    (Keras counts batches from 1, and logs every N-th from N)."""
    return int(steps[0]) - spacing(steps) if steps.size else 0


def epoch_starts(steps, ends: list[int]) -> np.ndarray:
    """The batch count before each epoch: `first_start`, then each epoch's end step.

    One entry per epoch in ``ends`` plus one for the batches after the last
    end (an unfinished epoch, possibly empty).
    """
    steps = np.asarray(steps, dtype=np.int64)
    return np.concatenate([[first_start(steps)], steps[list(ends)]]).astype(np.int64)


def deaverage(steps, values, ends: list[int]) -> np.ndarray:
    """Per-batch (or per-window) values from running means and epoch ends.

    Args:
      steps: Batch steps, increasing; the epochs start at `epoch_starts`.
      values: Running means at those steps.
      ends: `epoch_end_indices`; points after the last end are a partial
        epoch (training stopped before the epoch's value was written).

    Returns:
      float64 array like ``values``: at each point, the mean of the batches
      since the previous logged point of its epoch.
    """
    steps = np.asarray(steps, dtype=np.int64)
    m = np.asarray(values, dtype=np.float64)
    out = np.empty_like(m)
    lo = 0
    for start_step, hi in zip(epoch_starts(steps, ends), list(ends) + [steps.size - 1]):
        if hi < lo:
            continue
        k = (steps[lo:hi + 1] - start_step).astype(np.float64)
        mk = m[lo:hi + 1]
        k_prev = np.concatenate([[0.0], k[:-1]])
        m_prev = np.concatenate([[0.0], mk[:-1]])
        with np.errstate(invalid="ignore", over="ignore"):
            out[lo:hi + 1] = (k * mk - k_prev * m_prev) / (k - k_prev)
        # Once the running mean is non-finite the difference is NaN (inf - inf);
        # the batch that made it so and every later one keep the mean's value.
        bad = ~np.isfinite(mk)
        out[lo:hi + 1][bad] = mk[bad]
        lo = hi + 1
    return out


def _placed(run: RunData, tag: str) -> tuple[Series, list[int]] | None:
    """``tag``'s series and `epoch_end_indices`, or None where the epochs cannot be placed."""
    epoch_tag = EPOCH_TAG_OF.get(tag)
    batch = run.scalars.get(tag)
    epoch = run.scalars.get(epoch_tag) if epoch_tag else None
    if batch is None or epoch is None or len(batch) < 2 or not len(epoch):
        return None
    ends = epoch_end_indices(batch.steps, batch.values, epoch.values)
    if ends is None:
        ends = _last_epochs_ends(batch, epoch.values)
    return None if ends is None else (batch, ends)


MAX_FIRST_EPOCH_TRIES = 3


def _last_epochs_ends(batch: Series, epoch_values: np.ndarray) -> list[int] | None:
    """`epoch_end_indices` for batches that cover only the last epochs.

    Keras' batch counter restarts at every ``fit``, so after a second fit
    (``initial_epoch=3``) the batch steps hold that fit's batches only (the
    reader keeps the later training, `reader.restarts`) while ``epoch_loss``
    holds every epoch. The batches then start at one of the later epochs: the
    first few epochs whose value some batch holds are tried as that start.
    """
    values = np.asarray(epoch_values, dtype=np.float64)
    present = np.isin(values[1:].astype(np.float32), np.asarray(batch.values, dtype=np.float32))
    for first in (np.flatnonzero(present)[:MAX_FIRST_EPOCH_TRIES] + 1):
        ends = epoch_end_indices(batch.steps, batch.values, values[first:])
        if ends is not None:
            return ends
    return None


def per_batch(run: RunData, tag: str = "batch_loss") -> Series | None:
    """``tag``'s per-batch values, recovered from Keras' running mean.

    Returns:
      A `Series` at the batch tag's steps, or None when the run has no such
      tag, no epoch values to place the epochs with, or the two do not fit
      (a log not written by Keras' callback, batches that restarted, an
      epoch whose end was not logged).
    """
    placed = _placed(run, tag)
    if placed is None:
        return None
    batch, ends = placed
    return Series(steps=batch.steps.copy(), values=deaverage(batch.steps, batch.values, ends))


def epoch_positions(run: RunData, steps, tag: str = "batch_loss"
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """Where each of ``steps`` sits in its epoch: ``(position, epoch_length)`` in batches.

    ``position`` counts from 0; the batches after the last epoch end (an
    unfinished epoch) get the first epoch's length. None where `per_batch`
    cannot place the epochs.
    """
    placed = _placed(run, tag)
    if placed is None:
        return None
    batch, ends = placed
    starts = epoch_starts(batch.steps, ends)
    bounds = np.append(starts, starts[-1] + starts[1] - starts[0])
    steps = np.asarray(steps, dtype=np.int64)
    idx = np.clip(np.searchsorted(bounds, steps, side="left"), 1, bounds.size - 1)
    return steps - bounds[idx - 1] - 1, bounds[idx] - bounds[idx - 1]


def recoverable(run: RunData, tag: str = "batch_loss") -> bool:
    """True when `per_batch` can place ``tag``'s epochs (so recover its batches)."""
    return _placed(run, tag) is not None


def recoverable_tags(run: RunData) -> list[str]:
    """The batch tags of ``run`` whose epochs `per_batch` can place (so recover)."""
    return [tag for tag in EPOCH_TAG_OF if recoverable(run, tag)]
