"""Host reads written on a worker thread: nothing lost, failures contained, order kept."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest

from tests.test_instrumentation_support import (
    column,
    data,
    make_model,
    read_events,
    step_rows,
    var_vectors,
)

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402
from instrumentation import writer as writer_module  # noqa: E402
from instrumentation.host_jobs import HostJobs  # noqa: E402
from tb_stability import schema  # noqa: E402

WORKER = "tb-stability-writer"
STEPS = 100  # three reads of 32 steps on the worker thread, the rest at the end of fit


def _fit(tmp_path, callback_kw=None, epochs=1):
    x, y = data(n=STEPS * 4)
    model = make_model("functional")
    model.compile(keras.optimizers.SGD(0.01), "mse")
    callback = StabilityCallback(str(tmp_path), every=1, **(callback_kw or {}))
    history = model.fit(x, y, batch_size=4, epochs=epochs, shuffle=False, verbose=0,
                        callbacks=[callback])
    return callback, history


def _threads_of(monkeypatch, owner, name):
    """Names of the threads that call ``owner.name`` (a method of a class, or a function)."""
    seen = []
    original = getattr(owner, name)

    def recorded(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)
    return seen


def test_reads_are_written_on_the_worker_thread_and_nothing_is_lost(tmp_path, monkeypatch):
    drains = _threads_of(monkeypatch, writer_module.Drainer, "drain")
    _fit(tmp_path, epochs=2)
    # 2 x 100 steps, read every 32: six reads in training, each written by the
    # worker; the reads at the end of fit write on the training thread.
    on_worker = [name for name in drains if name.startswith(WORKER)]
    assert len(on_worker) == 2 * STEPS // 32
    assert not drains[-1].startswith(WORKER)
    events = read_events(tmp_path)
    steps = column(step_rows(events), "step")
    np.testing.assert_array_equal(steps, np.arange(2 * STEPS))  # each once, in order
    for quantity in schema.VARIABLE_QUANTITIES:
        assert sorted(var_vectors(events, quantity)) == list(range(2 * STEPS))
    # The epoch scalars, written on the training thread between two reads.
    assert [e.step for e in events[(".", "epoch_loss")]] == [0, 1]


def test_a_failing_background_write_becomes_one_warning_and_training_goes_on(
        tmp_path, monkeypatch):
    original = writer_module.SummaryWriter.write_variables

    def fails_off_the_training_thread(self, step, *args, **kwargs):
        # The second read (steps 32..63) fails, on the worker thread.
        if threading.current_thread().name.startswith(WORKER) and step >= 32:
            raise OSError("disk full (simulated)")
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(writer_module.SummaryWriter, "write_variables",
                        fails_off_the_training_thread)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback, history = _fit(tmp_path, epochs=2)
    disabled = [w for w in caught if "tb-stability" in str(w.message)]
    assert len(disabled) == 1, [str(w.message) for w in caught]
    assert "disk full (simulated)" in str(disabled[0].message)
    assert len(history.history["loss"]) == 2  # training finished
    assert callback._broken and not callback._active  # detached, nothing left patched
    # The read written before the failure is on disk.
    np.testing.assert_array_equal(column(step_rows(read_events(tmp_path)), "step"),
                                  np.arange(32))


def test_stop_on_nan_reads_are_written_on_the_training_thread(tmp_path, monkeypatch):
    drains = _threads_of(monkeypatch, writer_module.Drainer, "drain")
    _fit(tmp_path, callback_kw={"stop_on_nan": True})
    assert drains and not any(name.startswith(WORKER) for name in drains)


def test_host_jobs_run_one_at_a_time_in_order_and_reraise_on_wait():
    jobs = HostJobs()
    order = []
    release = threading.Event()

    def slow():
        release.wait(5)
        order.append("first")

    jobs.submit(slow)
    assert jobs.pending
    threading.Timer(0.05, release.set).start()
    jobs.submit(lambda: order.append("second"))  # waits for the first
    jobs.wait()
    assert order == ["first", "second"] and not jobs.pending

    def broken():
        raise ValueError("job failed")

    jobs.submit(broken)
    with pytest.raises(ValueError, match="job failed"):
        jobs.wait()
    jobs.wait()  # reported once
    jobs.close()
    assert not any(t.name.startswith(WORKER) for t in threading.enumerate())


def test_host_jobs_close_stops_the_thread_and_a_later_submit_restarts_it():
    jobs = HostJobs()
    names = []
    jobs.submit(lambda: names.append(threading.current_thread().name))
    jobs.close()
    jobs.submit(lambda: names.append(threading.current_thread().name))
    jobs.close()
    assert len(names) == 2 and all(n.startswith(WORKER) for n in names)
    deadline = time.monotonic() + 5
    while any(t.name.startswith(WORKER) for t in threading.enumerate()):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_pause_sleeps_only_inside_a_job_and_only_once_per_slice(monkeypatch):
    from instrumentation import host_jobs

    sleeps = []
    real_sleep = time.sleep
    monkeypatch.setattr(host_jobs.time, "sleep", lambda s: (sleeps.append(
        (threading.current_thread().name, s)), real_sleep(s)))
    clock = [0.0]
    monkeypatch.setattr(host_jobs.time, "perf_counter", lambda: clock[0])

    for _ in range(3):  # the training thread, outside any job: never sleeps
        clock[0] += 1.0
        host_jobs.pause()
    assert sleeps == []

    def job():
        for _ in range(10):  # within one slice: no sleep
            host_jobs.pause()
        clock[0] += host_jobs.SLICE_SECONDS
        host_jobs.pause()  # the slice is over: one sleep, a new slice starts
        host_jobs.pause()
        clock[0] += host_jobs.SLICE_SECONDS * 3
        host_jobs.pause()

    jobs = HostJobs()
    jobs.submit(job)
    jobs.close()
    assert [s for _, s in sleeps] == [host_jobs.PAUSE_SECONDS] * 2
    assert all(name.startswith(WORKER) for name, _ in sleeps)
    host_jobs.pause()  # after the job: a no-op again on this thread
    assert len(sleeps) == 2


def test_every_summary_written_on_the_worker_offers_the_gil(tmp_path, monkeypatch):
    from instrumentation import host_jobs

    pauses = _threads_of(monkeypatch, host_jobs, "pause")
    emits = _threads_of(monkeypatch, writer_module.SummaryWriter, "_emit_summary")
    _fit(tmp_path)
    on_worker = [name for name in emits if name.startswith(WORKER)]
    assert on_worker, "nothing was written on the worker thread"
    # one pause per summary, plus one per probe and per probe step read there
    assert len([n for n in pauses if n.startswith(WORKER)]) > len(on_worker)

