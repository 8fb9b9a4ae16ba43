"""Per-batch losses recovered from Keras' running-mean ``batch_loss``.

Two layers: the pure functions against a slow, obvious reference (a float32
running mean weighted by batch size, as Keras' loss tracker keeps it), and
real `keras.callbacks.TensorBoard(update_freq="batch")` logs, whose recovered
losses must equal the raw per-step losses the instrumentation records in the
same fit.
"""

import numpy as np
import pytest

from tb_stability import running_mean as RM
from tb_stability.detectors import _common as C
from tb_stability.rundata import RunData, Series


def keras_running_means(losses_per_epoch, sizes_per_epoch):
    """Slow reference: Keras' `Mean` tracker (float32 total and count), reset every epoch."""
    batch, epoch = [], []
    for losses, sizes in zip(losses_per_epoch, sizes_per_epoch):
        total, count = np.float32(0), np.float32(0)
        for loss, size in zip(losses, sizes):
            total = np.float32(total + np.float32(loss) * np.float32(size))
            count = np.float32(count + np.float32(size))
            batch.append(np.float32(total / count))
        epoch.append(batch[-1])
    return np.array(batch, np.float64), np.array(epoch, np.float64)


def _run(batch_steps, batch_values, epoch_values):
    return RunData(name="train", scalars={
        "batch_loss": Series(np.asarray(batch_steps, np.int64), np.asarray(batch_values, np.float64)),
        "epoch_loss": Series(np.arange(len(epoch_values), dtype=np.int64),
                             np.asarray(epoch_values, np.float64)),
    })


def _epochs(rng, epochs, per_epoch, last_size=32):
    losses = [rng.gamma(4.0, 0.25, per_epoch) * (1.0 + 0.05 * e) for e in range(epochs)]
    sizes = [[32] * (per_epoch - 1) + [last_size] for _ in range(epochs)]
    return losses, sizes


@pytest.mark.parametrize("epochs,per_epoch", [(1, 50), (5, 37), (20, 200)],
                         ids=["one-epoch", "five-epochs", "long-epochs"])
def test_every_batch_logged_recovers_each_loss(epochs, per_epoch):
    rng = np.random.default_rng(epochs)
    losses, sizes = _epochs(rng, epochs, per_epoch)
    batch, epoch = keras_running_means(losses, sizes)
    steps = np.arange(1, batch.size + 1)
    ends = RM.epoch_end_indices(steps, batch, epoch)
    assert ends == [per_epoch * (e + 1) - 1 for e in range(epochs)]
    got = RM.deaverage(steps, batch, RM.epoch_starts(steps, ends))
    np.testing.assert_allclose(got, np.concatenate(losses), rtol=2e-4 * per_epoch / 50, atol=0)


def test_spike_is_recovered_at_its_step_where_the_running_mean_hides_it():
    rng = np.random.default_rng(0)
    losses, sizes = _epochs(rng, 3, 100)
    losses[1][80] = 50.0  # one bad batch late in epoch 2
    batch, epoch = keras_running_means(losses, sizes)
    steps = np.arange(1, batch.size + 1)
    run = _run(steps, batch, epoch)
    per_batch = RM.per_batch(run)
    assert per_batch is not None
    assert int(per_batch.steps[np.argmax(per_batch.values)]) == 181
    assert per_batch.values.max() == pytest.approx(50.0, rel=1e-3)
    # In the running mean the same batch moved the curve by well under 1x its median.
    jump = batch[180] - batch[179]
    assert jump < np.median(batch)


def test_smaller_last_batch_is_a_lower_bound_of_the_same_sign():
    rng = np.random.default_rng(1)
    losses, sizes = _epochs(rng, 2, 40, last_size=5)
    losses[0][-1] = 30.0
    losses[1][-1] = 0.01
    batch, epoch = keras_running_means(losses, sizes)
    steps = np.arange(1, batch.size + 1)
    got = RM.deaverage(steps, batch, RM.epoch_starts(steps, RM.epoch_end_indices(steps, batch, epoch)))
    np.testing.assert_allclose(got[:39], losses[0][:39], rtol=1e-4)
    before0, before1 = batch[38], batch[78]
    assert before0 < got[39] < 30.0  # a spike: recovered smaller, still far above the mean
    assert 0.01 < got[79] < before1   # a dip: recovered shallower, still below the mean
    assert got[39] - before0 == pytest.approx((30.0 - before0) * 5 * 40 / (39 * 32 + 5), rel=1e-3)


def test_every_nth_batch_logged_recovers_window_means():
    rng = np.random.default_rng(2)
    losses, sizes = _epochs(rng, 3, 60)
    batch, epoch = keras_running_means(losses, sizes)
    every = 4  # update_freq=4: Keras logs global batches 4, 8, ...
    steps = np.arange(every, batch.size + 1, every)
    logged = batch[steps - 1]
    ends = RM.epoch_end_indices(steps, logged, epoch)
    assert ends == [14, 29, 44]
    got = RM.deaverage(steps, logged, RM.epoch_starts(steps, ends))
    want = np.concatenate(losses).reshape(-1, every).mean(axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_epoch_stopped_early_and_unfinished_epoch():
    rng = np.random.default_rng(3)
    losses, sizes = _epochs(rng, 3, 30)
    losses[2], sizes[2] = losses[2][:12], sizes[2][:12]  # stop_training after 12 batches
    batch, epoch = keras_running_means(losses, sizes)
    steps = np.arange(1, batch.size + 1)
    assert RM.epoch_end_indices(steps, batch, epoch) == [29, 59, 71]
    # Killed during the third epoch: no epoch value for it; its batches are a partial epoch.
    ends = RM.epoch_end_indices(steps, batch, epoch[:2])
    assert ends == [29, 59]
    np.testing.assert_allclose(RM.deaverage(steps, batch, RM.epoch_starts(steps, ends)),
                               np.concatenate(losses), rtol=1e-4)


def test_nan_batch_keeps_its_nan_and_places_the_epoch():
    rng = np.random.default_rng(4)
    losses, sizes = _epochs(rng, 2, 20)
    losses[1][7:] = np.nan  # log(0) in the 8th batch of epoch 2; TerminateOnNaN stops there
    losses[1], sizes[1] = losses[1][:8], sizes[1][:8]
    batch, epoch = keras_running_means(losses, sizes)
    steps = np.arange(1, batch.size + 1)
    ends = RM.epoch_end_indices(steps, batch, epoch)
    assert ends == [19, 27]
    got = RM.deaverage(steps, batch, RM.epoch_starts(steps, ends))
    assert np.isnan(got[27]) and np.all(np.isfinite(got[:27]))
    np.testing.assert_allclose(got[:27], np.concatenate(losses)[:27], rtol=1e-4)


def test_batches_of_a_later_fit_are_placed_on_its_epochs():
    # Keras' batch counter restarts at every fit: after fit(initial_epoch=2)
    # the batch steps hold that fit's epochs only (the reader keeps the later
    # fit), while epoch_loss holds every epoch.
    rng = np.random.default_rng(5)
    losses, sizes = _epochs(rng, 4, 30)
    batch, epoch = keras_running_means(losses, sizes)
    run = _run(np.arange(1, 31), batch[60:90], epoch[:3])
    np.testing.assert_allclose(RM.per_batch(run).values, losses[2], rtol=1e-4)
    run = _run(np.arange(1, 61), batch[60:], epoch)
    np.testing.assert_allclose(RM.per_batch(run).values, np.concatenate(losses[2:]), rtol=1e-4)
    position, length = C.epoch_positions(run, C.PER_BATCH_SOURCE, [1, 30, 31, 60])
    assert position.tolist() == [0, 29, 0, 29] and length.tolist() == [30] * 4


@pytest.mark.parametrize("case", ["later-fit-of-other-epochs", "epoch-end-not-logged", "no-epoch-values",
                                  "epoch-values-do-not-match"])
def test_logs_that_do_not_fit_are_left_unrecovered(case):
    rng = np.random.default_rng(5)
    losses, sizes = _epochs(rng, 2, 30)
    batch, epoch = keras_running_means(losses, sizes)
    steps = np.arange(1, batch.size + 1)
    if case == "later-fit-of-other-epochs":  # its epoch values were not logged
        run = _run(steps[:30], batch[30:], epoch[:1])
    elif case == "epoch-end-not-logged":  # update_freq=7 does not divide 30 batches
        run = _run(steps[6::7], batch[6::7], epoch)
    elif case == "no-epoch-values":
        run = RunData(name="train", scalars={"batch_loss": Series(steps, batch)})
    else:
        run = _run(steps, batch, epoch * 1.5)
    assert RM.per_batch(run) is None
    assert C.loss_series(run)[1] != C.PER_BATCH_SOURCE


def test_loss_series_prefers_per_batch_over_epoch_loss_and_keeps_plain_loss_first():
    rng = np.random.default_rng(6)
    losses, sizes = _epochs(rng, 2, 30)
    batch, epoch = keras_running_means(losses, sizes)
    run = _run(np.arange(1, batch.size + 1), batch, epoch)
    series, source = C.loss_series(run)
    assert source == C.PER_BATCH_SOURCE and len(series) == 60
    run.scalars["loss"] = Series(np.arange(5), np.ones(5))
    assert C.loss_series(run)[1] == "scalar:loss"
    validation = _run(np.arange(1, batch.size + 1), batch, epoch)
    validation.name = "model_a/validation"
    assert C.loss_series(validation) == (None, "")


def test_epoch_positions_of_recovered_losses():
    rng = np.random.default_rng(7)
    losses, sizes = _epochs(rng, 3, 10)
    batch, epoch = keras_running_means(losses, sizes)
    run = _run(np.arange(1, 31), batch, epoch)
    position, length = C.epoch_positions(run, C.PER_BATCH_SOURCE, [1, 10, 11, 20, 30])
    assert position.tolist() == [0, 9, 0, 9, 9]
    assert length.tolist() == [10, 10, 10, 10, 10]


def _keras_epoch_series(epoch_values, numbers):
    return Series(np.asarray(numbers, np.int64), np.asarray(epoch_values, np.float64)[numbers])


@pytest.mark.parametrize("every,per_epoch,epochs", [(7, 30, 8), (4, 30, 6), (5, 29, 6)],
                         ids=["7-of-30", "4-of-30", "5-of-29"])
def test_epochs_placed_from_the_few_epoch_values_keras_writes(every, per_epoch, epochs):
    # With an integer update_freq Keras writes an epoch's value only when it
    # logs the epoch's last batch.
    rng = np.random.default_rng(every)
    losses, sizes = _epochs(rng, epochs, per_epoch)
    batch, epoch = keras_running_means(losses, sizes)
    steps = np.arange(every, batch.size + 1, every)
    numbers = [e for e in range(epochs) if (e + 1) * per_epoch % every == 0]
    assert 0 < len(numbers) < epochs
    run = RunData(name="train", scalars={"batch_loss": Series(steps, batch[steps - 1]),
                                         "epoch_loss": _keras_epoch_series(epoch, numbers)})
    flat = np.concatenate(losses)
    want = [flat[max(s - every, (s - 1) // per_epoch * per_epoch):s].mean() for s in steps]
    np.testing.assert_allclose(RM.per_batch(run).values, want, rtol=1e-4)
    # An epoch value that is not the logged running mean at its end places nothing.
    run.scalars["epoch_loss"] = _keras_epoch_series(epoch * 1.5, numbers)
    assert RM.per_batch(run) is None


def test_a_smaller_last_batch_below_a_raised_mean_is_left_out():
    rng = np.random.default_rng(8)
    losses, sizes = _epochs(rng, 4, 40, last_size=5)
    steps = np.arange(1, 161)
    batch, epoch = keras_running_means(losses, sizes)
    clean = RM.per_batch(_run(steps, batch, epoch))
    assert clean.steps.tolist() == steps.tolist()  # an ordinary run keeps every point
    for e in range(4):
        losses[e][12] = 300.0  # a bad batch that raises the rest of the epoch's mean
    losses[3][-1] = 40.0  # a spike on the last small batch: above the mean, kept
    batch, epoch = keras_running_means(losses, sizes)
    got = RM.per_batch(_run(steps, batch, epoch))
    assert got.steps.tolist() == [s for s in steps if s not in (40, 80, 120)]
    full = got.steps % 40 != 0
    np.testing.assert_allclose(got.values[full], np.concatenate(losses)[got.steps[full] - 1],
                               rtol=1e-3)
    assert batch[158] < got.values[-1] < 40.0  # the kept spike: a lower bound
