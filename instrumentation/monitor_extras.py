"""Activation probes and batch statistics for `StabilityMonitor` (custom training loops).

The callback learns where a train step starts from Keras' ``train_step``; a
hand-written loop has none. Here the model's ``call`` is wrapped on the
instance (`MonitorExtras.attach`): a call traced inside a ``tf.function``
with ``training=True`` (or, for a model whose ``call`` takes no ``training``
argument, under a recording ``tf.GradientTape``) is a training forward pass,
and its activations are probed on probe steps exactly as the callback's
(`instrumentation.probes`). Evaluation and prediction calls, and eager calls,
are untouched. The batch statistics (`instrumentation.data_stats`) come from
what ``observe`` is given (``inputs``, ``labels``, ``predictions``).

Steps are the monitor's counter: the forward pass of step ``s`` runs before
that step's ``observe``, which advances the counter to ``s + 1``.

A failure here disables only these extras, with one warning; the monitor's
own statistics go on.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import numpy as np
import tensorflow as tf

from instrumentation import config_check
from instrumentation.data_stats import DataStats, first_tensor
from instrumentation.extras import probe_run_info, write_records
from instrumentation.instance_patches import InstancePatches
from instrumentation.probes import ActivationProbes
from instrumentation.writer import warn_disabled

logger = logging.getLogger("instrumentation")

try:
    from tensorflow.python.eager.record import could_possibly_record as _tape_recording
except Exception:  # noqa: BLE001 - another TensorFlow: rely on `training=True` alone
    def _tape_recording() -> bool:
        return False


def as_tensors(structure):
    """``structure`` with its arrays as tensors (an eager loop may pass numpy batches)."""
    if structure is None:
        return None
    return tf.nest.map_structure(
        lambda v: tf.convert_to_tensor(v) if isinstance(v, (np.ndarray, np.generic)) else v,
        structure)


class LossNamed:
    """A model seen with the loss a custom loop trains it with (``model.loss`` is unset).

    `config_check` and `writer.run_info` read the loss from ``model.loss``;
    every other attribute is the model's.
    """

    def __init__(self, model, loss):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "loss", loss)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_model"), name)


def with_loss(model, loss):
    """``model`` as `config_check` should see it: with ``loss`` where it has none of its own."""
    if model is None or loss is None or getattr(model, "loss", None) is not None:
        return model
    return LossNamed(model, loss)


def is_training_call(kwargs: dict) -> bool:
    """Whether a traced model call is a training forward pass.

    ``training=True`` says so; ``training=False`` says not. Without a Python
    bool (no ``training`` argument in the model's ``call``, or a tensor), a
    call under a recording ``tf.GradientTape`` is taken for one.
    """
    training = kwargs.get("training")
    if isinstance(training, bool):
        return training
    return bool(_tape_recording())


class MonitorExtras:
    """Probes and batch statistics of one `StabilityMonitor`.

    Args:
      model: The Keras model the loop trains (its layers are probed).
      every: Probe on steps with ``step % every == 0``.
      step_fn: Returns the current 0-based step as a tensor (inside the step).
      slots: Probe steps kept between two host reads.
      loss: The loss the loop trains with (a name, a callable or a Keras
        `Loss`), for a model that was not compiled with one.
    """

    def __init__(self, model, every: int, step_fn: Callable[[], Any], slots: int,
                 loss: Any = None):
        self.model = model
        self.every = max(1, int(every))
        self.config_model = with_loss(model, loss)
        self.probes: Optional[ActivationProbes] = None
        self.data: Optional[DataStats] = None
        self.broken = False
        self.shapes: dict = {}
        self._patches = InstancePatches()
        self._slots = max(2, int(slots))
        if model is not None:
            self.probes = ActivationProbes(model, self.every, step_fn, self._slots)

    # --------------------------------------------------------------- install

    def attach(self) -> None:
        """Wraps the model's ``call`` and its layers' activations (instances only)."""
        if self.probes is None or self._patches or self.broken:
            return
        try:
            self.probes.attach()
            self._patches.set(self.model, "call", self._wrap_call(self.model.call))
        except Exception as error:  # noqa: BLE001
            self._fail(error)

    def detach(self) -> None:
        """Restores the model's ``call`` and the layers' activations."""
        self._patches.restore(on_error=lambda error, attr: logger.debug(
            "could not restore %s", attr, exc_info=error))
        if self.probes is not None:
            self.probes.detach()

    def _wrap_call(self, original):
        extras = self

        def call(*args, **kwargs):
            probes = extras.probes
            if (extras.broken or probes is None or probes.tracing or tf.executing_eagerly()
                    or not is_training_call(kwargs)):
                return original(*args, **kwargs)  # not a traced training pass, or nested
            try:
                probes.tracing, probes.log_mode = True, "cond"
                probes.begin_step()
            except Exception as error:  # noqa: BLE001
                probes.tracing = False
                extras._fail(error)
                return original(*args, **kwargs)
            try:
                outputs = original(*args, **kwargs)
                probes.finish_step()
                return outputs
            finally:
                probes.tracing = False

        call.__wrapped__ = original
        return call

    def _fail(self, error: BaseException) -> None:
        if not self.broken:
            warn_disabled("activation probes and batch statistics", error, logger)
        self.broken = True
        try:
            self.detach()
        except Exception:  # noqa: BLE001
            logger.debug("detach failed", exc_info=True)

    # ----------------------------------------------------------------- graph

    def record_batch(self, step, inputs, labels, predictions) -> None:
        """Adds the batch statistics of a step (`DataStats.record`); call inside ``observe``."""
        if self.broken or (inputs is None and labels is None):
            return
        try:
            inputs, labels, predictions = (as_tensors(v) for v in (inputs, labels, predictions))
            self.shapes = batch_shapes(labels, predictions)
            if self.data is None:
                mode, logits = (config_check.classification_mode(self.config_model)
                                if self.config_model is not None else (None, False))
                self.data = DataStats(self.every, mode, logits, self._slots)
            self.data.record(step, inputs, labels, predictions)
        except Exception as error:  # noqa: BLE001
            self._fail(error)

    # ------------------------------------------------------------------ host

    def drain(self, writer) -> None:
        """Writes the probe and batch records made since the last call."""
        if self.broken:
            return
        try:
            write_records(writer, self.probes, self.data)
        except Exception as error:  # noqa: BLE001
            self._fail(error)

    def run_info_extra(self) -> dict:
        """Config-check and probe fields for ``stability/run_info``, and the shapes of the
        labels and predictions (`batch_shapes`)."""
        if self.model is None:
            return dict(self.shapes)
        return {**self.shapes,
                **probe_run_info(self.config_model, self.probes, self.data, self.every)}


def batch_shapes(labels, predictions) -> dict:
    """``{"label_shape", "prediction_shape"}``: the static shapes of the first label and
    prediction tensors (None for an unknown dimension), where both are dense tensors.

    A ``(B,)`` beside a ``(B, 1)`` broadcasts to ``(B, B)`` in a hand-written
    loss (`tb_stability.detectors._label_shapes`).
    """
    try:
        firsts = [first_tensor(structure) for structure in (labels, predictions)]
    except (TypeError, ValueError):  # not convertible to a dense tensor: nothing to say
        return {}
    if any(t is None or t.shape.rank is None for t in firsts):
        return {}
    return {"label_shape": firsts[0].shape.as_list(), "prediction_shape": firsts[1].shape.as_list()}
