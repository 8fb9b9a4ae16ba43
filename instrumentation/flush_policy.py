"""Time-based flushing: bounds what a killed training process can lose.

The host reads the statistics every ``read_every`` steps. With slow steps that
can be minutes apart, and the event file is only flushed when the host asks.
So, in addition, the host checks a monotonic clock after every call of the
train function (one ``time.monotonic()`` call, ~50 ns) and, when more than
`FLUSH_SECONDS` have passed since the last flush, drains the device buffers
and flushes the event file even though ``read_every`` steps have not passed.

Worst case on ``SIGKILL`` (or a power cut): the steps recorded since the last
flush, i.e. at most ``FLUSH_SECONDS`` plus the duration of one call of the
train function (one step, or ``steps_per_execution`` steps). A Python
exception in training flushes everything first (see `callback.py`), and a
normal interpreter exit flushes through ``atexit``.
"""

from __future__ import annotations

import time
from typing import Callable

FLUSH_SECONDS = 5.0
"""Seconds between two time-based drains + flushes of the event file."""



class FlushPolicy:
    """Says when a time-based flush is due.

    Args:
      seconds: Minimum seconds between two flushes.
      clock: Monotonic clock (injectable for tests).
    """

    def __init__(self, seconds: float = FLUSH_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.seconds = float(seconds)
        self._clock = clock
        self._last = clock()

    def due(self) -> bool:
        """True (and restarts the clock) when ``seconds`` passed since the last flush."""
        now = self._clock()
        if now - self._last >= self.seconds:
            self._last = now
            return True
        return False

    def reset(self) -> None:
        """Restarts the clock (a flush just happened for another reason)."""
        self._last = self._clock()


def after_train_call(callback) -> None:
    """Called by `StabilityCallback`'s wrapped train function after each call.

    Also used, as `after_tick`, by `StabilityMonitor.tick`.

    Drains and flushes when `FLUSH_SECONDS` passed since the last time-based
    flush. Never raises: failures go through the callback's ``_guard`` (one
    warning, instrumentation disabled, training continues).
    """
    policy = getattr(callback, "_flush_policy", None)
    if policy is None:
        policy = FlushPolicy(getattr(callback, "flush_seconds", FLUSH_SECONDS))
        callback._flush_policy = policy
        return
    if policy.due():
        callback._guard(callback._drain)
        # The callback creates its writer lazily (``_writer``); the monitor's is ``writer``.
        writer = vars(callback)["_writer"] if "_writer" in vars(callback) else getattr(
            callback, "writer", None)
        if writer is not None and not callback._broken:
            callback._guard(writer.flush)


after_tick = after_train_call
"""The same for `StabilityMonitor.tick` (the monitor has the same ``_guard``/``_drain``)."""
