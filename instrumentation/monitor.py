"""`StabilityMonitor`: the callback's measurements for custom training loops.

Example:
  ```python
  monitor = StabilityMonitor("logs/run1", every=50, optimizer=optimizer,
                             jit_compile=True,  # observe() runs in an XLA function
                             model=model,       # optional: probes its activations
                             loss=loss_fn)      # optional: the loss, for findings

  @tf.function(jit_compile=True)
  def train_step(x, y):
      with tf.GradientTape() as tape:
          y_pred = model(x, training=True)
          loss = loss_fn(y, y_pred)
      grads = tape.gradient(loss, model.trainable_variables)
      optimizer.apply_gradients(zip(grads, model.trainable_variables))
      monitor.observe(loss, grads, model.trainable_variables,
                      inputs=x, labels=y, predictions=y_pred)  # optional: batch statistics
      return loss

  with monitor:
      for x, y in dataset:
          train_step(x, y)
          monitor.tick()   # host side: reads the statistics every `read_every` ticks
  ```
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import tensorflow as tf

from instrumentation import config_check
from instrumentation import distribute
from instrumentation import flush_policy
from instrumentation import train_hooks
from instrumentation import update_capture
from instrumentation.monitor_extras import MonitorExtras
from instrumentation.gradient_sums import GradientSums, gradient_sums
from instrumentation.graph_values import current_graph, plain_variable, tf_variable
from instrumentation.monitor_nan import MonitorCapture
from instrumentation.stats import StepStats
from instrumentation.writer import ColumnsWriter, Drainer, SummaryWriter, run_info, warn_disabled
from tb_stability import schema

logger = logging.getLogger("instrumentation")


class StabilityMonitor:
    """Records training-stability signals from a hand-written training loop.

    `observe` runs inside the user's ``tf.function`` (XLA included) and only
    updates non-trainable variables; `tick`, `flush` and `close` run on the
    host and write the `tb_stability.schema` summaries to ``log_dir``.

    Steps are counted by the monitor (0, 1, 2, ... per `observe` call) unless
    ``step`` is passed to `observe`. The update ratio at a log step ``s`` is
    ``|w(s) - w(s-1)| / |w(s-1)|`` between consecutive `observe` calls, and the
    weight norm is ``|w(s-1)|``; call `observe` after the optimizer update for
    these to describe update ``s`` exactly (as `StabilityCallback` does).

    With ``optimizer`` a Keras built-in optimizer (one replica, no loss
    scaling, accumulation or moving average; `update_capture.expected`), its
    ``apply`` is wrapped while the monitor is open and a traced step whose
    update is the only write to each weight in that step reports that update
    itself: ``|Δw|`` from the optimizer's update tensors and ``w(s-1)`` as
    ``w(s) - Δw``, with no copy of the weights. Such a step does not see
    writes to the weights made outside it (another function called between
    steps); any other step falls back to the copy.

    Args:
      log_dir: Run directory for the event files.
      every: Log per-variable vectors on steps with ``step % every == 0``.
      variables: The variables to track; by default those passed to the first
        `observe` call.
      optimizer: Optional Keras optimizer, for the learning rate and run info.
      capacity: Steps kept on the device between two reads (default
        ``read_every + every + 1``); older unread steps are dropped with a
        warning.
      snapshot_weights: Measure the update ratio (from the optimizer's update
        tensors where it can, see above; otherwise from a copy of the weights
        taken after the step before each log step).
      strategy: The ``tf.distribute`` strategy of the loop (default: the
        current one). With several replicas, call `observe` inside
        ``strategy.run`` with each replica's gradients: statistics are summed
        over replicas with one unconditional all-reduce (see
        `instrumentation.distribute`) and a ``nonfinite_replicas`` column is
        added; only the chief writes to ``log_dir``.
      jit_compile: Whether `observe` runs inside an XLA-compiled function
        (``tf.function(jit_compile=True)``). On a CPU the norms are then
        summed in a form XLA computes faster (`graph_values.half_sum_squares`).
      model: Optional Keras model. Its layers' activations are recorded in
        the run info (`config_check.layer_activations`), so that findings name
        them and fit their remedy to the layer (an LSTM is not fixed like a
        Dense layer), and they are probed (dead, saturated, mean, spread)
        every ``probe_every`` steps in its training forward passes: calls
        traced in a ``tf.function`` with ``training=True``, or under a
        recording ``tf.GradientTape`` for a ``call`` without that argument
        (`instrumentation.monitor_extras`).
      probe_every: Activation probes and batch statistics every this many
        steps (default: ``every``; 0 disables both). With several replicas
        neither is recorded.
      loss: Optional loss the loop trains with (a name, a callable or a
        Keras ``Loss``), for a model not compiled with one: findings then
        name it, and the configuration check pairs it with the output layer.
      read_every: Ticks between two host reads of the statistics (default
        ``every``, or its first multiple >= 32, as `StabilityCallback`'s:
        `train_hooks.read_interval`). Each read copies the device-side
        records to the host and costs about a millisecond on the training
        thread; with ``every=1`` a read per step doubled a small MLP's step.
      nan_forensics: Capture the first step whose gradients are not finite
        (the weights before its update and the batch given to `observe`),
        re-run it eagerly to find where the non-finite values start (inputs,
        a layer, labels, the loss) and save it under
        ``<log_dir>/nan_origin/`` (`instrumentation.monitor_nan`). Needs
        ``optimizer=`` (a Keras built-in one, one replica) and, for the
        re-run, ``model=`` and ``inputs=``/``labels=`` in `observe`; costs
        one branch per step and, once, a copy of the weights.
    """

    def __init__(
        self,
        log_dir: str,
        every: int = 100,
        variables: Optional[Sequence[Any]] = None,
        optimizer: Any = None,
        capacity: Optional[int] = None,
        snapshot_weights: bool = True,
        strategy: Any = None,
        jit_compile: bool = False,
        model: Any = None,
        probe_every: Optional[int] = None,
        loss: Any = None,
        read_every: Optional[int] = None,
        nan_forensics: bool = True,
    ):
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if read_every is not None and int(read_every) < 1:
            raise ValueError(f"read_every must be >= 1, got {read_every}")
        self.log_dir = str(log_dir)
        self.every = int(every)
        self.read_every = int(read_every) if read_every else train_hooks.read_interval(self.every)
        self.optimizer = optimizer
        self.capacity = int(capacity) if capacity else self.read_every + self.every + 1
        self.snapshot_weights = bool(snapshot_weights)
        self.jit_compile = bool(jit_compile)
        self.model = model
        self.strategy = strategy or tf.distribute.get_strategy()
        self._extra_columns = ()
        if distribute.num_replicas(self.strategy) > 1:
            self._extra_columns = ("nonfinite_replicas",)
        self.writer = SummaryWriter(distribute.writer_log_dir(self.log_dir, self.strategy))
        self._stats: Optional[StepStats] = None
        self._drainer: Optional[Drainer] = None
        self._broken = False
        self._info_written = False
        self._since_read = 0
        with tf.init_scope():
            self._counter = plain_variable(tf.constant(0, tf.int64), "stability_step")
        self.probe_every = self.every if probe_every is None else int(probe_every)
        self._extras: Optional[MonitorExtras] = None
        if self.probe_every > 0 and not self._extra_columns:
            self._extras = MonitorExtras(
                model, self.probe_every, self._counter.read_value,
                slots=self.capacity // self.probe_every + 2, loss=loss)
            self._extras.attach()
        self._apply_watch: Optional[update_capture.ApplyWatch] = None
        self._nan: Optional[MonitorCapture] = None
        self._pending_sums = None  # (graph, variable ids, GradientSums) of the traced apply
        self._observed_graph = None
        if (optimizer is not None
                and update_capture.expected(optimizer, distribute.num_replicas(self.strategy))):
            if nan_forensics:
                self._nan = MonitorCapture(model, loss, jit=self.jit_compile)
            if self.snapshot_weights or self._nan is not None:
                try:
                    self._apply_watch = update_capture.ApplyWatch(
                        optimizer, before=self._before_apply if self._nan is not None else None)
                    self._apply_watch.attach()
                except Exception as error:  # noqa: BLE001 - the snapshot measures it instead
                    logger.debug("optimizer.apply not wrapped", exc_info=error)
                    self._apply_watch, self._nan = None, None
        if variables is not None:
            self._ensure_stats(variables)

    # ------------------------------------------------------------ graph side

    def observe(
        self,
        loss: Any,
        gradients: Sequence[Any],
        variables: Optional[Sequence[Any]] = None,
        learning_rate: Any = None,
        step: Any = None,
        grad_scale: Any = None,
        inputs: Any = None,
        labels: Any = None,
        predictions: Any = None,
    ) -> None:
        """Records one training step (inside a ``tf.function`` or eagerly).

        Args:
          loss: The raw loss of this step (scalar).
          gradients: Gradients, aligned with ``variables`` (``None`` allowed).
          variables: The variables of ``gradients``; default: tracked ones.
          learning_rate: The learning rate; default: the optimizer's, else NaN.
          step: Explicit 0-based global step; default: the monitor's counter.
          grad_scale: Loss-scale factor ``gradients`` are multiplied by (mixed
            precision with scaled gradients); they are reported divided by it.
          inputs: Optional batch inputs (a tensor or a structure of them): their
            per-feature mean, std, min and max every ``probe_every`` steps.
          labels: Optional batch labels: class counts (with ``predictions``, for
            a classifier) or per-target statistics (regression), and their range.
          predictions: Optional model outputs of the batch (class counts).
        """
        if self._broken:
            return
        try:
            stats = self._ensure_stats(variables)
            stats.xla = self.jit_compile
            if step is None:
                step = self._counter.read_value()
            step = tf.cast(step, tf.int64)
            if learning_rate is None:
                learning_rate = (
                    self.optimizer.learning_rate if self.optimizer is not None else float("nan")
                )
            self._observed_graph = current_graph()
            gradients = list(gradients)
            sums = self._take_sums(gradients, variables, grad_scale)
            local = stats.local_stats(gradients, variables, loss, grad_scale, sums=sums)
            extras = {}
            replica = distribute.replica_context()
            if replica is not None:
                with tf.control_dependencies([step]):  # read the counter before syncing
                    local, extras = distribute.reduce_local_stats(*replica, local)
            state = stats.write_row(step, local, learning_rate, extras)
            changes = (self._apply_watch.changes(stats.variables)
                       if self._apply_watch is not None and self.snapshot_weights else None)
            stats.record_update(state, changes=changes)
            if not stats.uses_changes(changes):  # the next log step reads a copy
                stats.snapshot_when(tf.equal(tf.math.floormod(step + 1, self.every), 0),
                                    valid_for=step + 1)
            if sums is not None or not tf.executing_eagerly():
                # Eager steps share one graph: only an apply of these very gradients
                # just before says the weights copied (if any) are this step's.
                self._capture_batch(step, local.nonfinite, inputs, labels)
            self._counter.assign(step + 1)
        except Exception as error:  # noqa: BLE001 - never break training
            self._fail(error)
            return
        if self._extras is not None:  # fails on its own, leaving the statistics on
            self._extras.record_batch(step, inputs, labels, predictions)

    def _before_apply(self, grads: list, variables: list) -> None:
        """In the traced ``optimizer.apply``, before the update: the gradients' norms, with
        the NaN capture's weight copy in their non-finite branch (`instrumentation.monitor_nan`)."""
        nan = self._nan
        if self._broken or nan is None or nan.broken or (
                not tf.executing_eagerly() and self._observed_graph is current_graph()):
            return  # off, or observe() came first in this trace: its pairing would be wrong
        try:
            hook = nan.weights_hook(self._counter, variables)
            sums = gradient_sums(grads, self.jit_compile, None, hook)
            self._pending_sums = (current_graph(), _variable_ids(variables), sums)
        except Exception as error:  # noqa: BLE001 - never break training
            nan.fail(error)

    def _take_sums(self, gradients: list, variables, grad_scale) -> Optional[GradientSums]:
        """The traced apply's `GradientSums` where they are of these gradients and variables."""
        pending, self._pending_sums = self._pending_sums, None
        if pending is None or grad_scale is not None:
            return None
        graph, keys, sums = pending
        variables = self._stats.variables if variables is None else list(variables)
        if graph is not current_graph() or keys != _variable_ids(variables) \
                or not sums.of(gradients):
            return None
        return sums

    def _capture_batch(self, step, nonfinite, inputs, labels) -> None:
        nan = self._nan
        if nan is None or nan.broken:
            return
        try:
            nan.after_observe(step, self._counter, nonfinite, inputs, labels)
        except Exception as error:  # noqa: BLE001 - never break training
            nan.fail(error)

    def _ensure_stats(self, variables) -> StepStats:
        if self._stats is None:
            if variables is None:
                raise ValueError("pass `variables` to the monitor or to the first observe()")
            self._stats = StepStats(list(variables), self.every, self.capacity,
                                    self.snapshot_weights, extra_columns=self._extra_columns)
            if self._apply_watch is not None:  # some traces may skip the copy
                self._stats.expect_snapshot_steps()
            with tf.init_scope():
                self._stats.snapshot_when(True)  # weights before the first update
            self._drainer = Drainer(
                self._stats, ColumnsWriter(self.writer, self._stats.columns), next_step=0
            )
        return self._stats

    # ------------------------------------------------------------- host side

    def tick(self, steps: int = 1) -> None:
        """Counts ``steps`` finished steps; reads and writes every ``read_every`` steps."""
        self._since_read += int(steps)
        if self._since_read >= self.read_every:
            self._since_read = 0
            self._guard(self._drain)
        flush_policy.after_tick(self)  # time-based drain + flush (crash safety)

    def flush(self) -> None:
        """Writes every recorded step and flushes the event file."""
        self._guard(self._drain)
        self._guard(self.writer.flush)

    def close(self) -> None:
        """Flushes and closes the event file, and restores the model's and optimizer's methods."""
        self.flush()
        self._guard(self.writer.close)
        if self._apply_watch is not None:
            self._guard(self._apply_watch.detach)
        if self._extras is not None:
            self._guard(self._extras.detach)

    def __enter__(self) -> "StabilityMonitor":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def first_nonfinite_step(self) -> Optional[int]:
        """First step with a non-finite loss or gradient seen so far by the host."""
        return self._drainer.first_nonfinite_step if self._drainer else None

    def _drain(self) -> None:
        if self._drainer is None or self._broken:
            return
        if not self._info_written:
            self._info_written = True
            extras = self._extras
            model = extras.config_model if extras is not None else None
            extra = extras.run_info_extra() if extras is not None else {}
            info = run_info(model, self.optimizer, self.every, self._stats.names, extra)
            info["source"] = "StabilityMonitor"
            info["jit_compile"] = self.jit_compile
            info["model_class"] = type(self.model).__name__ if self.model is not None else None
            info.pop("steps_per_execution", None)
            if self.model is not None:
                try:
                    info["layer_activations"] = config_check.layer_activations(self.model)
                except Exception as error:  # noqa: BLE001 - never fail training
                    logger.debug("layer activations failed", exc_info=error)
            self.writer.write_json(schema.TAG_RUN_INFO, self._drainer.next_step, info)
        self._drainer.drain()
        if self._extras is not None:
            self._extras.drain(self.writer)
        if self._nan is not None:
            try:
                self._nan.drain(self.writer, self._drainer.first_nonfinite_step)
            except Exception as error:  # noqa: BLE001 - the forensics alone stop
                self._nan.fail(error)

    def _guard(self, fn) -> None:
        try:
            fn()
        except Exception as error:  # noqa: BLE001
            self._fail(error)

    def _fail(self, error: BaseException) -> None:
        if not self._broken:
            warn_disabled("monitor", error, logger)
        self._broken = True


def _variable_ids(variables) -> list[int]:
    return [id(tf_variable(v)) for v in variables]
