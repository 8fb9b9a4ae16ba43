"""One host-side job at a time on a worker thread, beside the training thread.

A host read has two halves. The first copies the statistics variables to the
host (`instrumentation.readback`): it must run between two train steps, on
the training thread. The second turns those numpy arrays into events (decode
the ring and the slots, encode and append ~10 summaries per recorded step,
run the live detectors): pure host work on values already copied, about
3-4 ms per read of 32 steps with ``every=1`` on a 2-core machine, i.e. ~3 %
of a 4 ms step. `HostJobs` runs that second half on a worker thread while
the next steps train (TensorFlow releases the GIL while a step runs).

At most one job is in flight: `submit` and `wait` first wait for the previous
one, and re-raise its exception on the calling (training) thread, where the
callback's usual guard turns it into one warning. Whoever touches the writer
or the drain state on the training thread waits first.

The job is pure Python, so it holds the GIL while it runs, and CPython makes
a thread that wants the GIL wait a whole switch interval (5 ms by default)
before it asks the holder to let go. The training thread needs the GIL for a
moment between two steps (Keras' loop, the callbacks): left alone, the job
would stall it for up to 5 ms per step for as long as it runs. So the job's
loops call `pause`, which, every `SLICE_SECONDS` of work, sleeps for
`PAUSE_SECONDS` (a sleep releases the GIL) and the training thread gets it
at once. Outside a job `pause` does nothing.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Callable, Optional

SLICE_SECONDS = 2e-4
"""Longest stretch of a worker job between two chances for the training thread to run."""

PAUSE_SECONDS = 5e-5
"""How long `pause` sleeps (releasing the GIL)."""

_job = threading.local()  # .deadline: set on the worker thread while a job runs


def pause() -> None:
    """Lets the training thread take the GIL if this job ran `SLICE_SECONDS` since the last pause.

    Call it in the loops of a job (per summary written, per probe read). A
    no-op outside a `HostJobs` job: the training thread never sleeps here.
    """
    deadline = getattr(_job, "deadline", None)
    if deadline is None or time.perf_counter() < deadline:
        return
    time.sleep(PAUSE_SECONDS)
    _job.deadline = time.perf_counter() + SLICE_SECONDS


def _sliced(job: Callable[[], None]) -> Callable[[], None]:
    """``job`` run with `pause` active (on the worker thread)."""

    def run() -> None:
        _job.deadline = time.perf_counter() + SLICE_SECONDS
        try:
            job()
        finally:
            _job.deadline = None

    return run


class HostJobs:
    """A single-slot queue of host jobs run on one worker thread (created lazily)."""

    def __init__(self):
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._future: Optional[concurrent.futures.Future] = None

    @property
    def pending(self) -> bool:
        """Whether a submitted job has not been waited for yet."""
        return self._future is not None

    def submit(self, job: Callable[[], None]) -> None:
        """Runs ``job`` on the worker thread, after waiting for the previous job.

        Runs it inline instead when no thread can be started (interpreter
        shutdown).
        """
        self.wait()
        try:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="tb-stability-writer")
            self._future = self._pool.submit(_sliced(job))
        except RuntimeError:  # "cannot schedule new futures after interpreter shutdown"
            self._future = None
            job()

    def wait(self) -> None:
        """Waits for the job in flight, if any; re-raises its exception here."""
        future, self._future = self._future, None
        if future is not None:
            future.result()

    def close(self) -> None:
        """Waits for the job in flight (re-raising its exception) and stops the thread."""
        try:
            self.wait()
        finally:
            pool, self._pool = self._pool, None
            if pool is not None:
                pool.shutdown(wait=True)
