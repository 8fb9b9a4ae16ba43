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

With an integer ``update_freq`` that does not divide the epoch, Keras
writes ``epoch_loss`` only for the epochs whose last batch it logs (its
``record_if`` holds the batch count): the epochs are then placed from those
epoch numbers, all epochs the same length (`_periodic_starts`), and the
first logged point of each epoch holds the mean of the batches so far.

Limits, stated where the values are used:

* A batch smaller than the others (an epoch's remainder) is weighted less in
  the running mean, so its recovered deviation from the mean before it is
  ``b/B`` of the true one at most: a lower bound in size, same sign. Above
  the mean before it, the true loss is at least the recovered one. Below it,
  the true loss may be anywhere under the recovered one, so where the
  recovered value would stand out above the batches before it (the mean was
  raised by a bad batch earlier in the epoch) it says nothing and is left
  out (`UNDETERMINED_Z`).
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


def epoch_of(steps, starts) -> np.ndarray:
    """Each step's epoch: the index of the last of ``starts`` below it (-1 before the first)."""
    return np.searchsorted(np.asarray(starts, dtype=np.int64), np.asarray(steps, dtype=np.int64),
                           side="left") - 1


def deaverage(steps, values, starts) -> np.ndarray:
    """Per-batch (or per-window) values from running means and epoch starts.

    Args:
      steps: Batch steps, increasing.
      values: Running means at those steps.
      starts: The batch count before each epoch, increasing (`epoch_starts`):
        a step ``s`` belongs to the epoch of the last start below it. Points
        after the last end are a partial epoch (training stopped before the
        epoch's value was written).

    Returns:
      float64 array like ``values``: at each point, the mean of the batches
      since the previous logged point of its epoch (since the epoch's start
      for its first logged point).
    """
    steps = np.asarray(steps, dtype=np.int64)
    m = np.asarray(values, dtype=np.float64)
    epoch = epoch_of(steps, starts)
    k = (steps - np.asarray(starts, dtype=np.int64)[np.maximum(epoch, 0)]).astype(np.float64)
    same = np.concatenate([[False], epoch[1:] == epoch[:-1]])
    k_prev = np.where(same, np.concatenate([[0.0], k[:-1]]), 0.0)
    m_prev = np.where(same, np.concatenate([[0.0], m[:-1]]), 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        out = (k * m - k_prev * m_prev) / (k - k_prev)
    # Once the running mean is non-finite the difference is NaN (inf - inf);
    # the batch that made it so and every later one keep the mean's value.
    bad = ~np.isfinite(m)
    out[bad] = m[bad]
    return out


UNDETERMINED_Z = 3.0  # robust z above the points before it: "would stand out"
UNDETERMINED_WINDOW = 20


def undetermined(steps, values, starts, recovered) -> np.ndarray:
    """Which recovered epoch ends say nothing about their batch (module docstring).

    An epoch's last batch may be smaller than the others. Where the running
    mean fell at it, the true loss lies anywhere below the recovered value;
    that value is left out where it would stand out (robust z above
    `UNDETERMINED_Z`) among the `UNDETERMINED_WINDOW` recovered values
    before it.

    Returns:
      A boolean mask over ``steps``.
    """
    steps = np.asarray(steps, dtype=np.int64)
    m = np.asarray(values, dtype=np.float64)
    epoch = epoch_of(steps, starts)
    out = np.zeros(steps.size, dtype=bool)
    for index in np.flatnonzero(np.isin(steps, np.asarray(starts)[1:])):
        if index == 0 or not m[index] < m[index - 1]:
            continue
        if epoch[index - 1] != epoch[index]:
            continue  # the epoch's only logged point: the whole epoch's mean, exact
        window = slice(max(0, index - UNDETERMINED_WINDOW), index)
        before = recovered[window][np.isfinite(recovered[window]) & ~out[window]]
        if before.size < 3:
            continue
        median = float(np.median(before))
        spread = max(1.4826 * float(np.median(np.abs(before - median))), 1e-3 * abs(median))
        out[index] = recovered[index] > median + UNDETERMINED_Z * spread
    return out


def _placed(run: RunData, tag: str) -> tuple[Series, np.ndarray] | None:
    """``tag``'s series and its epochs' `epoch_starts`, or None where they cannot be placed."""
    epoch_tag = EPOCH_TAG_OF.get(tag)
    batch = run.scalars.get(tag)
    epoch = run.scalars.get(epoch_tag) if epoch_tag else None
    if batch is None or epoch is None or len(batch) < 2 or not len(epoch):
        return None
    numbers = np.asarray(epoch.steps, dtype=np.int64)
    if numbers[0] != 0 or np.any(np.diff(numbers) != 1):
        # Some epochs' values are missing: only those whose end was logged.
        starts = _periodic_starts(batch, epoch)
        return None if starts is None else (batch, starts)
    ends = epoch_end_indices(batch.steps, batch.values, epoch.values)
    if ends is None:
        ends = _last_epochs_ends(batch, epoch.values)
    return None if ends is None else (batch, epoch_starts(batch.steps, ends))


def _periodic_starts(batch: Series, epoch: Series) -> np.ndarray | None:
    """`epoch_starts` from the numbers of the epochs whose value was written.

    Keras writes an epoch's value only when it logs the epoch's last batch,
    so with epochs of ``P`` batches that start in epoch ``E0`` (0 for a single
    fit; the batch count restarts with every fit), epoch ``e`` ends at batch
    ``first_start + (e - E0 + 1) P``. A placement holds when every epoch
    value whose end falls on the logged batches is the running mean logged
    there, and every epoch end logged has its value; the first ``E0`` (then
    ``P``) that holds is taken.
    """
    steps = np.asarray(batch.steps, dtype=np.int64)
    values = np.asarray(batch.values, dtype=np.float64)
    numbers = np.asarray(epoch.steps, dtype=np.int64)
    start = first_start(steps)
    value_of = dict(zip(numbers.tolist(), np.asarray(epoch.values, dtype=np.float64).tolist()))
    logged = dict(zip(steps.tolist(), range(steps.size)))
    for e, target in value_of.items():
        hits = steps[_same(values, target)]
        if hits.size:
            break
    else:
        return None
    end = int(hits[0])
    for first_epoch in range(0, e + 1):
        period, rest = divmod(end - start, e - first_epoch + 1)
        if rest or period < spacing(steps):
            continue
        count = (int(steps[-1]) - start) // period
        ends = start + period * np.arange(1, count + 1)
        holds = all(
            (int(s) in logged) == (first_epoch + j in value_of)
            and (int(s) not in logged
                 or _same(values[logged[int(s)]:logged[int(s)] + 1], value_of[first_epoch + j])[0])
            for j, s in enumerate(ends)
        )
        if holds:
            return start + period * np.arange(0, count + 1)
    return None


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
      A `Series` at the batch tag's steps (less the epoch ends that say
      nothing, `undetermined`), or None when the run has no such
      tag, no epoch values to place the epochs with, or the two do not fit
      (a log not written by Keras' callback, batches that restarted, an
      epoch whose end was not logged).
    """
    placed = _placed(run, tag)
    if placed is None:
        return None
    batch, starts = placed
    recovered = deaverage(batch.steps, batch.values, starts)
    keep = ~undetermined(batch.steps, batch.values, starts, recovered)
    return Series(steps=batch.steps[keep], values=recovered[keep])


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
    starts = placed[1]
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
