"""Keras wiring: `StabilityCallback` hooks `StepStats` into ``model.fit``.

How it attaches (Keras 3, TensorFlow backend):

* ``on_train_begin`` wraps, on the instances only, ``optimizer.apply`` (gradient
  statistics, weight snapshot, update ratio), ``optimizer.scale_loss`` and
  ``model.compute_loss`` (the raw per-step loss), rebuilds the train function
  (``make_train_function(force=True)``) so the next trace carries the
  statistics ops, and wraps ``model.train_function`` to read the statistics
  every ``every`` steps and to flush when training raises.
* With one step per call and ``every > 1`` it builds *two* train functions
  and the host picks one per step: on log steps (``step % every == 0``) one
  that computes everything (per-variable norms, update ratios, probes, data
  statistics) with no condition in the graph; on the other steps a lean one
  that only writes the per-step row (loss, gradient norm, non-finite count,
  learning rate) and keeps the NaN capture. Conditions in the graph cost every
  step (the executor visits the untaken branch, and a branch that reads the
  weights orders the optimizer's update after it), so the steps in between
  pay for nothing they do not record. Each function is traced on first use.
  ``every == 1`` uses the first only; ``steps_per_execution > 1`` one function
  that decides in the graph (`instrumentation.stats.LOG_MODES`).
* ``on_train_end`` (or the error path) drains, flushes, restores every
  original attribute and resets ``model.train_function`` so a later ``fit``
  without the callback runs none of these ops.

Failures of the instrumentation itself become one warning; training goes on.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import warnings
import weakref
from typing import Any, Optional

import keras
import tensorflow as tf

from instrumentation import distribute
from instrumentation import optimizer_step
from instrumentation import readback
from instrumentation import train_hooks
from instrumentation.extras import CallbackExtras
from instrumentation.host_jobs import HostJobs
from instrumentation.instance_patches import InstancePatches
from instrumentation.live import LiveDiagnosis, warning_line
from instrumentation.stats import StepStats
from instrumentation.writer import ColumnsWriter, Drainer, SummaryWriter, run_info, warn_disabled
from tb_stability import schema

logger = logging.getLogger("instrumentation")


class StabilityCallback(keras.callbacks.Callback):
    """Records per-step and per-variable training-stability signals.

    Every step: raw batch loss, global gradient L2 norm, number of non-finite
    gradient values and learning rate. Every ``every`` steps: per-variable
    gradient norm, weight norm and update ratio ``|Δw| / |w|``. Everything is
    computed inside the compiled train step (XLA included) and written to
    ``log_dir`` with the `tb_stability.schema` tags.

    Example:
      ```python
      model.fit(x, y, callbacks=[StabilityCallback("logs/run1", every=50)])
      ```

    Args:
      log_dir: Run directory for the event files (e.g. ``logs/run1``).
      every: Log per-variable vectors (and, by default, probe activations
        and data) every ``every`` steps. The host reads the statistics back
        every ``every`` steps, or every first multiple of ``every`` >= 32
        when ``every`` is smaller (`read_interval`): nothing is lost, the
        records wait in device-side slots.
      snapshot_weights: Measure the update ratio ``|Δw| / |w|``: ``Δw`` is the
        optimizer's own update tensor where it is verifiably the variable's
        whole change (`instrumentation.update_capture`), else the weights after
        minus before. Log steps hold the weights before the update as tensors
        (no extra memory between steps); only with ``steps_per_execution > 1``
        are they copied into variables (one extra copy of the weights).
        ``False``: no update ratio is written.
      probe_every: Activation probes and input/label/prediction statistics
        every ``probe_every`` steps (default: ``every``; 0 disables them).
      live_warnings: Print one concise line (logger ``instrumentation``) when a
        critical finding (nan_inf, exploding_gradients, divergence) first
        appears, using the same detectors as ``tb-stability report``.
      stop_on_nan: Stop training (``model.stop_training = True``) once the
        host sees the first non-finite loss or gradient, after flushing. The
        host reads every `read_interval` steps, so training stops within those
        steps of the first NaN; its step is recorded exactly either way.
      nan_forensics: Capture the first non-finite step (batch and weights
        before it; one extra copy of the weights), find its origin and save
        it under ``<log_dir>/nan_origin/`` (`instrumentation.nan_origin`).
      read_every: Steps between two host reads (default: `read_interval`
        of ``every``). Smaller: findings and ``stop_on_nan`` react sooner;
        larger: less host time per step.
    """

    # Batch hooks are not overridden: host work runs in the wrapped train
    # function (the copy to the host on the training thread, the writing on a
    # worker thread: `HostJobs`), so asynchronous dispatch is safe.
    async_safe = True

    def __init__(self, log_dir: str, every: int = 100, snapshot_weights: bool = True,
                 probe_every: Optional[int] = None, nan_forensics: bool = True,
                 live_warnings: bool = True, stop_on_nan: bool = False,
                 read_every: Optional[int] = None):
        super().__init__()
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.log_dir = str(log_dir)
        self.every = int(every)
        if read_every is not None and int(read_every) < 1:
            raise ValueError(f"read_every must be >= 1, got {read_every}")
        self.read_every = int(read_every) if read_every is not None else None
        self.snapshot_weights = bool(snapshot_weights)
        self._writer: Optional[SummaryWriter] = None
        self._stats: Optional[StepStats] = None
        self._drainer: Optional[Drainer] = None
        self._patches = InstancePatches()
        self._active = False
        self._broken = False
        self._warned: set = set()
        self._run_end: Optional[int] = None  # the step after the last one written, offset included
        self._trace = train_hooks.TraceState()
        self._info_written = False
        self._since_read = 0
        self._next_step = 0
        self._functions: dict = {}
        self._trace_mode = "cond"
        self._spe = 1
        self._read_interval = self.every
        self._capacity = 0
        self._start_step = 0
        self._stats_ready = False
        self._atexit_registered = False
        self._extras = CallbackExtras(self, probe_every, nan_forensics)
        self.live_warnings = bool(live_warnings)
        self.stop_on_nan = bool(stop_on_nan)
        self._live: Optional[LiveDiagnosis] = None
        self._batch = readback.BatchedRead()
        self._host_jobs = HostJobs()  # writes a read's events while training goes on

    # ----------------------------------------------------------- Keras hooks

    def on_train_begin(self, logs=None):
        self._broken = False
        if self._active:  # a previous fit ended without on_train_end
            self._guard(self._finish)
        self._guard(self._begin)

    def on_epoch_end(self, epoch, logs=None):
        if self._active and not self._broken:
            self._guard(self._host_jobs.wait)  # one writer, one thread at a time
            if not self._broken:
                self._guard(self._extras.epoch_end, epoch, logs)

    def on_train_end(self, logs=None):
        if self._active:
            self._guard(self._finish)

    # ------------------------------------------------------------ public API

    @property
    def writer(self) -> SummaryWriter:
        """The host-side summary writer (created on first use)."""
        if self._writer is None:
            strategy = getattr(self.model, "distribute_strategy", None)
            self._writer = SummaryWriter(distribute.writer_log_dir(self.log_dir, strategy))
            if not self._atexit_registered:
                atexit.register(_flush_at_exit, weakref.ref(self))
                self._atexit_registered = True
        return self._writer

    def flush(self) -> None:
        """Writes every recorded step and flushes the event file."""
        self._guard(self._drain)
        self._guard(self.writer.flush)

    # ------------------------------------------------------------ internals

    def _guard(self, fn, *args) -> Any:
        try:
            return fn(*args)
        except Exception as error:  # noqa: BLE001 - never break training
            self._fail(error)
            return None

    def _fail(self, error: BaseException) -> None:
        if not self._broken:
            warn_disabled("instrumentation", error, logger)
        self._broken = True

    def _begin(self) -> None:
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None:
            raise ValueError("the model has no optimizer; compile it first")
        self._spe = max(1, int(getattr(model, "steps_per_execution", 1) or 1))
        self._read_interval = self.read_every or train_hooks.read_interval(self.every)
        self._capacity = self._read_interval + self._spe + 1
        self._start_step = int(distribute.micro_iterations(optimizer).numpy())
        self._next_step = self._start_step  # host count of the next step
        # A later fit of this callback with a fresh optimizer (fine-tuning after a
        # recompile) restarts iterations at 0: its steps continue the run's instead.
        if self._run_end is not None:
            self.writer.step_offset = max(0, self._run_end - self._start_step)
        self._since_read = 0
        self._info_written = False
        self._trace = train_hooks.TraceState()
        self._stats_ready = False
        self._drainer = None
        self._extra_columns = optimizer_step.extra_columns(model, optimizer)
        distribute.warn_unmeasured(self, optimizer)  # clipvalue, gradient accumulation
        if model.built and model.trainable_variables:
            self._ensure_stats(model.trainable_variables)
        self._install(model, optimizer)
        self._active = True

    def _ensure_stats(self, variables=None) -> StepStats:
        """The `StepStats` of this fit (created, or reused and reset, on first need).

        Called on train begin for built models, otherwise during the first
        trace of the train step (after the model has built its variables).
        """
        if self._stats_ready:
            return self._stats
        variables = list(self.model.trainable_variables) or list(variables or [])
        stats = self._stats
        if (
            stats is None
            or stats.capacity != self._capacity
            or stats.every != self.every
            or [id(v) for v in stats.variables] != [id(v) for v in variables]
            or stats.measure_update != self.snapshot_weights
            or stats.columns[len(schema.STEP_COLUMNS):] != self._extra_columns
        ):
            stats = StepStats(variables, self.every, self._capacity, self.snapshot_weights,
                              extra_columns=self._extra_columns)
        else:
            with tf.init_scope():
                stats.reset()
        self._stats = stats
        self._drainer = Drainer(stats, ColumnsWriter(self.writer, stats.columns),
                                next_step=self._start_step)
        if self.live_warnings:
            if self._live is None:
                self._live = LiveDiagnosis(self.log_dir)
            self._drainer.listeners.append(self._live)
        self._stats_ready = True
        return stats

    def _install(self, model, optimizer) -> None:
        self._patch(optimizer, "apply", train_hooks.make_apply(self, optimizer, optimizer.apply))
        self._patch(optimizer, "scale_loss",
                    train_hooks.make_loss_hook(self, optimizer.scale_loss, scale=True))
        self._patch(model, "compute_loss",
                    train_hooks.make_loss_hook(self, model.compute_loss, scale=False))
        self._patch(model, "fit", train_hooks.make_fit_guard(self, model.fit))
        self._patch(model, "train_step", train_hooks.make_train_step(self, model.train_step))
        self._install_extras(model, optimizer)
        self._functions = self._train_functions(model)
        model.train_function = train_hooks.make_train_function(self, self._functions)

    def _train_functions(self, model) -> dict:
        """The train functions the host chooses from, by log mode (`stats.LOG_MODES`).

        With one step per call and ``every > 1`` there are two: ``"always"``
        for log steps (every statistic, no condition in the graph) and
        ``"never"`` for the others (only the per-step row), so the steps in
        between pay for nothing else. With ``every == 1`` only ``"always"``;
        with ``steps_per_execution > 1`` (several steps per call) a single
        ``"cond"`` function decides in the graph (also when ``probe_every``
        differs from ``every``). Each is traced on first use.
        """
        probe_every = self._extras.every
        if self._spe > 1 or probe_every not in (0, self.every):
            modes = ("cond",)  # several steps per call, or probes on their own schedule
        elif self.every == 1:
            modes = ("always",)
        else:
            modes = ("always", "never")
        functions = {}
        for mode in modes:
            model.make_train_function(force=True)
            functions[mode] = model.train_function
        return functions

    def _patch(self, obj, name: str, value) -> None:
        self._patches.set(obj, name, value)

    def _uninstall(self) -> None:
        self._active = False
        self._extras.uninstall()
        self._patches.restore(on_error=lambda error, _: self._fail(error))
        self._functions = {}
        if self.model is not None:
            self.model.train_function = None

    def _finish(self) -> None:
        """Drains, flushes and detaches (end of fit, or error).

        Each clean-up step runs even when an earlier one raises: the worker
        thread is stopped, then the event file flushed, then the patches undone.
        """
        with contextlib.ExitStack() as cleanup:  # runs its callbacks last-in first-out
            cleanup.callback(self._uninstall)
            cleanup.callback(self._note_run_end)
            cleanup.callback(self._flush_writer)
            cleanup.callback(self._host_jobs.close)
            if not self._broken:
                self._drain()
                self._announce_live(force=True)

    def _note_run_end(self) -> None:
        if self._drainer is not None and self._writer is not None:
            self._run_end = self._drainer.next_step + self._writer.step_offset

    def _flush_writer(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def _drain(self, background: bool = False) -> None:
        """Reads the statistics back and writes them.

        Args:
          background: Write on the worker thread (`HostJobs`) while training
            goes on. The copy to the host is made here either way; the
            writing stays on this thread when it cannot wait: with
            ``stop_on_nan`` (training must stop at this read) or when the NaN
            capture fired (its forensics re-run the model).
        """
        self._host_jobs.wait()
        if self._broken or (self._drainer is None and not self._trace.not_recorded):
            return
        if not self._info_written:
            self._info_written = True
            self.writer.write_json(
                schema.TAG_RUN_INFO,
                self._start_step,
                run_info(self.model, self.model.optimizer, self.every,
                         self._stats.names if self._stats is not None else (),
                         extra={**self._extras.run_info_extra(), **self._trace.run_info(),
                                "steps_per_epoch": self._steps_per_epoch()}),
            )
        if self._drainer is None:  # nothing recorded; run_info says why
            return
        # One device-to-host copy of every statistics variable, and one
        # summary op per step written (see `readback` and `SummaryWriter.batch`).
        stats = self._stats
        self._batch.refresh([stats.ring, stats.var_stats, stats.var_steps]
                            + self._extras.variables())
        if (background and not self.stop_on_nan and not self._batch.failed
                and not self._extras.capture_found(self._batch)):
            self._host_jobs.submit(self._write_read)
        else:
            self._write_read()

    def _steps_per_epoch(self) -> Optional[int]:
        """Batches per epoch as `fit` knows them (None for a dataset of unknown length)."""
        try:
            steps = int((getattr(self, "params", None) or {}).get("steps"))
        except (TypeError, ValueError):
            return None
        return steps if steps > 0 else None

    def _write_read(self) -> None:
        """Writes the values the last `_drain` copied (on either thread)."""
        self._drainer.batch = self._batch
        try:
            with self.writer.batch():
                before = self._drainer.saw_nonfinite
                self._drainer.drain()
                if self._drainer.saw_nonfinite and not before:
                    if self.stop_on_nan:
                        self.model.stop_training = True
                self._extras.drain(self._batch)
                if self._live is not None and self._extras.origin is not None:
                    self._live.feed_origin(self._extras.origin["step"], self._extras.origin)
        finally:
            self._drainer.batch = None
            self._batch.clear()
        self._announce_live(force=self._drainer.saw_nonfinite and not before)

    def _announce_live(self, force: bool = False) -> None:
        """Runs the live detectors; a failure there only disables live warnings."""
        if self._live is None:
            return
        try:
            findings = self._live.check(force=force)
        except Exception as error:  # noqa: BLE001 - never break training
            self._live = None
            warnings.warn(f"tb-stability: live warnings disabled after an error: {error!r}",
                          RuntimeWarning, stacklevel=2)
            return
        for finding in findings:
            logger.warning("%s", warning_line(finding, self.log_dir))

    def _warn_once(self, key: str, message: str) -> None:
        """Warns ``message`` the first time ``key`` comes up for this callback."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    # ---------------------- activation probes, data stats, NaN origin (extras.py)

    def _install_extras(self, model, optimizer) -> None:
        """Probes, data statistics and NaN capture; see `instrumentation.extras`."""
        self._extras.install(model, optimizer)


def _flush_at_exit(ref) -> None:
    callback = ref()
    if callback is None:
        return
    try:
        if callback._active and not callback._broken:
            callback._drain()
        callback._flush_writer()
    except Exception:  # noqa: BLE001 - interpreter shutdown
        pass
