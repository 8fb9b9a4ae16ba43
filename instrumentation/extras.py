"""Glue between `StabilityCallback` and the probes, data statistics, NaN origin and config check.

Kept out of ``callback.py`` so that module stays small; the callback calls
`CallbackExtras.install` (before the train function is rebuilt),
`CallbackExtras.drain` (every read), `CallbackExtras.run_info_extra` (first
read), `CallbackExtras.epoch_end` and `CallbackExtras.uninstall`.

Patches, on the instances only and through the callback's ``_patch`` (so the
callback restores them): ``model.train_step`` (marks the train-step trace, so
nothing is added to evaluation or prediction graphs) and ``model.compute_loss``
(x, y, y_pred, loss of the traced step). The callback's wrapped
``optimizer.apply`` calls `CallbackExtras.before_update` (the one-time NaN
capture before the update). A failure here disables only
these extras, with one warning; the callback's own statistics go on.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import keras

from instrumentation import config_check
from instrumentation.data_stats import DataStats
from instrumentation.graph_values import current_graph
from instrumentation.nan_capture import NanCapture
from instrumentation.nan_origin import find_origin, save_and_report, swapped_weights
from instrumentation.probes import ActivationProbes
from instrumentation.writer import warn_disabled
from tb_stability import schema

logger = logging.getLogger("instrumentation")
_LOSS_ARGS = ("x", "y", "y_pred", "sample_weight")


class CallbackExtras:
    """Activation probes, data statistics, NaN origin and config check of one callback.

    Args:
      callback: The owning `StabilityCallback` (for ``_patch``, ``writer``, ``model``).
      probe_every: Probe activations and data every this many steps
        (default: the callback's ``every``); 0 disables probes and data stats.
      nan_forensics: Capture the first non-finite step (costs one copy of the
        trainable weights in memory) and find its origin.
    """

    def __init__(self, callback, probe_every: Optional[int] = None, nan_forensics: bool = True):
        self.callback = callback
        self.probe_every = probe_every
        self.nan_forensics = bool(nan_forensics)
        self.tracing = False
        self.log_mode = "cond"
        self.batch_recorded = False  # compute_loss saw this trace's batch
        self.broken = False
        self.probes: Optional[ActivationProbes] = None
        self.data: Optional[DataStats] = None
        self.capture: Optional[NanCapture] = None
        self.origin: Optional[dict] = None

    @property
    def every(self) -> int:
        return int(self.probe_every if self.probe_every is not None else self.callback.every)

    # --------------------------------------------------------------- install

    def install(self, model, optimizer) -> None:
        """Creates the parts and patches train_step, compute_loss and apply."""
        self.broken = False
        self.origin = None
        step_fn = lambda: optimizer.iterations  # noqa: E731
        if self.every > 0:
            # Enough slots for every probe step between two host reads.
            slots = max(1, int(getattr(self.callback, "_read_interval", 1))) // self.every + 2
            if self.probes is None or self.probes.model is not model:
                self.probes = ActivationProbes(model, self.every, step_fn, slots)
            else:  # the previous fit was read in full; the optimizer may be new
                self.probes.reset()
                self.probes.step_fn = step_fn
            self.probes.every, self.probes.slots = self.every, slots
            self.probes.attach()
            mode, logits = config_check.classification_mode(model)
            self.data = DataStats(self.every, mode, logits, slots)
        if self.nan_forensics:
            self.capture = NanCapture(jit=bool(getattr(model, "jit_compile", False)))
            if hasattr(optimizer, "inner_optimizer") and (
                    hasattr(optimizer, "dynamic_scale")
                    or type(optimizer).__name__ == "LossScaleOptimizer"):
                self.capture.loss_scale_optimizer = optimizer  # benign skips are not NaNs
        patch = self.callback._patch
        patch(model, "train_step", self._make_train_step(model.train_step))
        patch(model, "compute_loss", self._make_compute_loss(model.compute_loss, optimizer))

    def uninstall(self) -> None:
        """Restores the probed layers (the callback restores its own patches)."""
        if self.probes is not None:
            self.probes.detach()

    def _fail(self, error: BaseException) -> None:
        if not self.broken:
            warn_disabled("activation/data/NaN-origin probes", error, logger)
        self.broken = True

    # ------------------------------------------------------------- wrappers

    def _make_train_step(self, original):
        extras = self

        def train_step(*args, **kwargs):
            extras._set_tracing(True, getattr(extras.callback, "_trace_mode", "cond"))
            extras.batch_recorded = False
            if extras.tracing and extras.probes is not None and extras.probes.tracing:
                extras.probes.begin_step()
            wanted = extras.capture is not None or extras.data is not None
            batch = extras._unpack(args[0]) if extras.tracing and wanted and args else None
            if batch is not None and extras.capture is not None:
                # For a custom train_step that computes its loss itself, the
                # capture keeps this batch and its forensics replay the step
                # (`NanCapture.replay_with`); compute_loss, if called, replaces it.
                extras.capture.record_batch(*batch, None)
            try:
                logs = original(*args, **kwargs)
                if batch is not None and extras.tracing and not extras.batch_recorded:
                    extras._record_batch(batch)  # compute_loss was not called
                return logs
            finally:
                if extras.tracing and extras.probes is not None:
                    extras.probes.finish_step()  # when compute_loss was not called
                extras._set_tracing(False)

        return train_step

    def _unpack(self, data) -> Optional[tuple]:
        """``(x, y, sample_weight)`` of the batch ``train_step`` was given (Keras'
        convention, or ``x`` alone); None without inputs or on an internal error."""
        try:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        except Exception as error:  # noqa: BLE001
            self._fail(error)
            return None
        return (x, y, sample_weight) if x is not None else None

    def _record_batch(self, batch: tuple) -> None:
        """The batch statistics of a train step that never called ``compute_loss``.

        A custom ``train_step`` with a hand-written loss (or a GAN's) gets its
        input and label statistics from the batch it was given (`_unpack`), at
        the step of the update it made (none without one: nothing is
        recorded). Without ``compute_loss`` there is no prediction to count
        classes of.
        """
        trace = self.callback._trace
        if (self.broken or self.data is None or self.log_mode == "never"
                or trace.applied_graph is not current_graph()):
            return  # this trace made no update: no step to record at
        x, y, _ = batch
        try:
            self.data.record(trace.applied_step, x, y, None, always=self.log_mode == "always")
        except Exception as error:  # noqa: BLE001
            self._fail(error)

    def _set_tracing(self, value: bool, log_mode: str = "cond") -> None:
        """Marks the train-step trace; ``log_mode`` as `instrumentation.stats.LOG_MODES`."""
        self.tracing = value and not self.broken
        self.log_mode = log_mode
        if self.probes is not None:
            self.probes.tracing = self.tracing and log_mode != "never"
            self.probes.log_mode = log_mode

    def _make_compute_loss(self, original, optimizer):
        extras = self

        def compute_loss(*args, **kwargs):
            result = original(*args, **kwargs)
            if not extras.tracing or extras.broken:
                return result
            try:
                if extras.probes is not None and extras.probes.tracing:
                    extras.probes.finish_step()  # forward pass done: one cond for all probes
                values = dict(zip(_LOSS_ARGS, args))
                values.update({k: kwargs[k] for k in _LOSS_ARGS if k in kwargs})
                x, y, y_pred = values.get("x"), values.get("y"), values.get("y_pred")
                extras.batch_recorded = True
                if extras.data is not None and x is not None and extras.log_mode != "never":
                    extras.data.record(optimizer.iterations, x, y, y_pred,
                                       always=extras.log_mode == "always")
                if extras.capture is not None:
                    extras.capture.record_batch(x, y, values.get("sample_weight"), result)
            except Exception as error:  # noqa: BLE001
                extras._fail(error)
            return result

        return compute_loss

    def nonfinite_hook(self, optimizer, variables, sources_for=None):
        """The NaN capture as a hook for the statistics' non-finite branch, or None.

        None when there is nothing to capture in this trace or the capture
        must test every step itself (loss scaling: then call `before_update`).

        Args:
          sources_for: Optional ``f(variables)`` giving variables that already
            hold their pre-update values in this step (weight snapshots), or
            None where it has none for some; see `NanCapture.nonfinite_hook`.
        """
        if not self.tracing or self.broken or self.capture is None:
            return None
        try:
            variables = self._variables(variables)
            sources = sources_for(variables) if sources_for is not None else None
            capture = self.capture.nonfinite_hook(optimizer.iterations, variables, sources)
        except Exception as error:  # noqa: BLE001
            self._fail(error)
            return None
        if capture is None:
            return None
        extras = self

        def hook(count, loss):
            try:
                capture(count, loss)
            except Exception as error:  # noqa: BLE001 - only the extras stop
                extras._fail(error)

        return hook

    def _variables(self, variables) -> list:
        """``variables`` as a list; None means the model's trainable variables."""
        if variables is not None:
            return list(variables)
        return list(self.callback.model.trainable_variables)

    def before_update(self, optimizer, grads, variables, nonfinite=None) -> None:
        """Adds the one-time NaN capture; the callback's ``apply`` calls it before the update.

        Args:
          optimizer: The model's optimizer (its ``iterations`` numbers the step).
          grads: This step's gradients.
          variables: Their variables (None: the model's trainable variables).
          nonfinite: This replica's non-finite gradient count, already
            computed by the statistics (saves a pass over the gradients).
        """
        if not self.tracing or self.broken or self.capture is None:
            return
        try:
            variables = self._variables(variables)
            self.capture.on_apply(optimizer.iterations, list(grads), variables,
                                  nonfinite=nonfinite)
        except Exception as error:  # noqa: BLE001
            self._fail(error)

    # ------------------------------------------------------------------ host

    def run_info_extra(self) -> dict:
        """Config-check fields for ``stability/run_info`` (label range and batch size of the probes)."""
        return probe_run_info(self.callback.model, self.probes, self.data, self.every)

    def variables(self) -> list:
        """Every variable `drain` reads (for the callback's one batched read)."""
        if self.broken:
            return []
        out = []
        if self.probes is not None:
            out += self.probes.variables()
        if self.data is not None:
            out += self.data.variables()
        if self.capture is not None and self.origin is None and self.capture.step is not None:
            out.append(self.capture.step)
        return out

    def capture_found(self, batch=None) -> bool:
        """Whether the NaN capture holds a step whose forensics have not run yet."""
        return (not self.broken and self.capture is not None and self.origin is None
                and self.capture.captured_step(batch) is not None)

    def drain(self, batch=None) -> None:
        """Writes new probe and data records; runs the NaN forensics once.

        Args:
          batch: Optional `readback.BatchedRead` holding this read's values.
        """
        if self.broken:
            return
        writer = self.callback.writer
        try:
            write_records(writer, self.probes, self.data, batch)
            if self.capture is not None and self.origin is None:
                step = self.capture.captured_step(batch)
                if step is not None:
                    self.origin = self._forensics(step)
                    writer.write_json(schema.TAG_NAN_ORIGIN, step, self.origin)
                    writer.flush()
        except Exception as error:  # noqa: BLE001
            self._fail(error)

    def _forensics(self, step: int) -> dict:
        """Re-runs the captured step eagerly and saves the artefacts."""
        model, capture = self.callback.model, self.capture
        step_data = capture.captured(step)
        record: dict[str, Any] = dict(step_data.record)
        if self.probes is not None:
            self.probes.detach()
        try:
            with swapped_weights(capture.variables, step_data.weights):
                try:
                    record.update(find_origin(model, step_data.x, step_data.y,
                                              step_data.sample_weight, via=capture.replay_with))
                except Exception as error:  # noqa: BLE001 - still save the batch
                    record.update(origin="unknown", error=f"{type(error).__name__}: {error}"[:300])
                return save_and_report(self.callback.writer.log_dir, record, step_data.batch,
                                       step_data.names, step_data.weights, model)
        finally:
            if self.probes is not None:
                self.probes.attach()

    def epoch_end(self, epoch: int, logs: Optional[dict]) -> None:
        """Writes every Keras log value as an ordinary scalar ``epoch_<key>``."""
        if not logs:
            return
        # A failure here is the writer's: it propagates to the callback's guard.
        self.callback.writer.write_scalars(
            int(epoch), {f"epoch_{key}": value for key, value in logs.items()})


def write_records(writer, probes: Optional[ActivationProbes], data: Optional[DataStats],
                  batch=None) -> None:
    """Writes new probe tables and batch statistics (inputs, targets, class counts).

    Args:
      writer: The `instrumentation.writer.SummaryWriter`.
      probes: Activation probes, or None.
      data: Batch statistics, or None.
      batch: Optional `readback.BatchedRead` holding this read's values.
    """
    if probes is not None:
        for step, table in probes.read(batch):
            writer.write_layers(step, table)
    if data is None:
        return
    for record in data.read(batch):
        if record["inputs"] is not None:
            writer.write_inputs(record["step"], record["inputs"], record["names"])
        if record["targets"] is not None:
            writer.write_targets(record["step"], record["targets"], record["target_names"])
        if record["labels"] is not None:
            writer.write_counts(schema.TAG_LABELS, record["step"], record["labels"])
            writer.write_counts(schema.TAG_PREDICTIONS, record["step"], record["predictions"])


def probe_run_info(model, probes: Optional[ActivationProbes], data: Optional[DataStats],
                   every: int) -> dict:
    """`config_check.check_config` of ``model`` with the probed batch's label range and size,
    and the probed and unprobed layers; {} on an internal error."""
    try:
        label_range, batch_rows = None, None
        if data is not None and data.label_range is not None:
            lo, hi = (float(v) for v in data.label_range.numpy())
            label_range = (lo, hi) if lo == lo and hi == hi else None
            batch_rows = int(data.batch_rows.numpy()) or None
        extra = config_check.check_config(model, label_range, batch_rows)
        if probes is not None:
            extra["probed_layers"] = [p.name for p in probes.probes]
            extra["unprobed_layers"] = dict(probes.unprobed)
            extra["probe_every"] = int(every)
        return extra
    except Exception as error:  # noqa: BLE001
        logger.debug("config check failed", exc_info=error)
        return {}
