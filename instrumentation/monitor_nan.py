"""NaN forensics for `StabilityMonitor` (custom training loops).

`StabilityCallback` captures the first non-finite step inside Keras' train
step (`instrumentation.nan_capture`), where the batch and the weights before
the update are both in reach. A hand-written loop calls ``observe`` after the
update, when the weights before it are gone. So the capture is split in two:

1. In the optimizer's ``apply`` (wrapped by `update_capture.ApplyWatch`,
   before the update) the monitor computes the gradients' norms
   (`gradient_sums`) there rather than in ``observe``. Only when they are not
   finite does a branch run, and on the first such step only it copies the
   weights and notes the monitor's step counter (`MonitorCapture.weights_hook`).
   ``observe`` reuses those norms, so a healthy step pays nothing for the test.
   (Where ``observe`` is given other gradient tensors than ``apply`` was, say
   the raw ones beside clipped ones, it computes its own: the norms are then
   computed twice.)
2. In ``observe`` a branch taken only on a step with non-finite gradients
   copies the batch (``inputs``, ``labels``) when the weights were copied in
   this very step (`MonitorCapture.after_observe`): one ``If`` per step.
   How "this very step" is known: in a traced step, ``observe`` and ``apply``
   share the step's graph and ``apply`` came first in it (the monitor skips
   the copy in an ``apply`` traced after ``observe``); in an eager loop,
   where every step shares one graph, ``observe`` pairs only when it reused
   the norms of the ``apply`` just before it (the same gradient tensors).
3. Host side, at the next read after the first non-finite step
   (`MonitorCapture.drain`): the step is re-run eagerly with those weights
   (`nan_origin.find_origin`: the forward pass and the monitor's ``loss``, or
   ``model.compute_loss`` for a compiled model), and the artefacts are saved
   under ``<log_dir>/nan_origin/`` for ``tb-stability replay``.

Needs ``optimizer=`` (a Keras built-in one, `update_capture.expected`) for the
weights before the update, ``model=`` for the re-run and the ``inputs`` (and
``labels``) passed to ``observe``. A non-finite loss whose gradients stay
finite is not captured (no weight was harmed). A failure here disables the
forensics alone, with one warning; training and the statistics go on.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import tensorflow as tf

from instrumentation.graph_ops import rare_cond
from instrumentation.monitor_extras import as_tensors
from instrumentation.nan_capture import NanCapture
from instrumentation.nan_origin import (find_origin, loss_callable, loss_config, loss_label,
                                        save_and_report, swapped_weights)
from instrumentation.writer import warn_disabled
from tb_stability import schema

logger = logging.getLogger("instrumentation")


class MonitorCapture:
    """The monitor's capture of its first step with non-finite gradients (module docstring).

    Args:
      model: The Keras model the loop trains, or None (the batch and weights
        are still saved; nothing is re-run).
      loss: The loss the loop trains with (a Keras name, a ``Loss`` or a
        function of ``(y_true, y_pred)``), or None: a compiled model's
        ``compute_loss``, else the forward pass alone.
      jit: Whether ``observe`` runs under XLA (padded batch buffers).
    """

    def __init__(self, model: Any, loss: Any, jit: bool = False):
        self.model = model
        self.loss = loss
        self.capture = NanCapture(jit=jit)
        self.weights_at: Optional[tf.Variable] = None
        self.origin: Optional[dict] = None
        self.broken = False

    # ----------------------------------------------------------------- graph

    def weights_hook(self, counter: tf.Variable, variables: Sequence[Any]):
        """``hook(count, loss)`` for `gradient_sums`: copies the weights once (before the update).

        Args:
          counter: The monitor's step counter; its value is noted with the copy.
          variables: The variables the optimizer is about to update.
        """
        capture = self.capture
        capture.ensure_weights(list(variables))
        with tf.init_scope():
            if self.weights_at is None:
                self.weights_at = tf.Variable(tf.constant(-1, tf.int64), trainable=False,
                                              name="stability_nan_weights_step")
        copy = capture.weight_copier()

        def take():
            copy()
            self.weights_at.assign(counter.read_value())
            return tf.constant(True)

        def hook(count, loss):
            del count, loss  # the branch this runs in is the non-finite test
            rare_cond(self.weights_at < 0, take)

        return hook

    def after_observe(self, step, counter: tf.Variable, nonfinite, inputs, labels) -> None:
        """Copies the batch where this step's weights were just copied (graph side, in ``observe``).

        Args:
          step: The step ``observe`` records (int64).
          counter: The monitor's step counter, not yet advanced.
          nonfinite: This step's non-finite gradient count.
          inputs, labels: What ``observe`` was given (None allowed).
        """
        if self.weights_at is None:  # no apply traced with the hook: nothing to pair with
            return
        capture = self.capture
        inputs, labels = as_tensors(inputs), as_tensors(labels)  # an eager loop's numpy batch
        capture.ensure_batch(inputs, labels, None)
        copy_batch = capture.batch_copier(inputs, labels, None)
        step = tf.cast(step, tf.int64)

        def take():
            copy_batch()
            capture.step.assign(step)
            return tf.constant(True)

        def pair():
            now = tf.logical_and(tf.equal(self.weights_at, counter.read_value()), capture.step < 0)
            return rare_cond(now, take)

        rare_cond(nonfinite > 0, pair)

    # ------------------------------------------------------------------ host

    def drain(self, writer, first_nonfinite_step: Optional[int]) -> Optional[dict]:
        """Runs the forensics once the capture holds a step; returns the record written.

        Reads nothing from the device until the statistics saw a non-finite step.
        """
        if self.broken or self.origin is not None or first_nonfinite_step is None:
            return None
        step = self.capture.captured_step()
        if step is None:
            return None
        self.origin = self._forensics(step, writer.log_dir)
        writer.write_json(schema.TAG_NAN_ORIGIN, step, self.origin)
        writer.flush()
        return self.origin

    def _forensics(self, step: int, log_dir: str) -> dict:
        capture, model = self.capture, self.model
        step_data = capture.captured(step)
        via, loss_fn = self._replay_mode()
        record: dict[str, Any] = {
            **step_data.record, "source": "StabilityMonitor", "replay_with": via,
            "loss_name": loss_label(self.loss), "loss_config": loss_config(self.loss)}
        if model is None or step_data.x is None:
            missing = "model=" if model is None else "inputs= in observe()"
            record.update(origin="not_reproduced",
                          reason=f"the monitor was given no {missing}: nothing to re-run")
            return save_and_report(log_dir, record, step_data.batch, step_data.names,
                                   step_data.weights, None)
        with swapped_weights(capture.variables, step_data.weights):
            try:
                record.update(find_origin(model, step_data.x, step_data.y, via=via,
                                          loss_fn=loss_fn))
            except Exception as error:  # noqa: BLE001 - still save the batch
                record.update(origin="unknown", error=f"{type(error).__name__}: {error}"[:300])
            return save_and_report(log_dir, record, step_data.batch, step_data.names,
                                   step_data.weights, model)

    def _replay_mode(self) -> tuple[str, Any]:
        """``(via, loss_fn)`` for `find_origin`: the monitor's loss, else a compiled model's."""
        loss_fn = loss_callable(self.loss)
        if loss_fn is None and getattr(self.model, "loss", None) is not None \
                and getattr(self.model, "compiled", False):
            return "compute_loss", None
        return "loss_fn", loss_fn

    def fail(self, error: BaseException) -> None:
        """Disables the forensics alone, with one warning."""
        if not self.broken:
            warn_disabled("NaN forensics", error, logger)
        self.broken = True
