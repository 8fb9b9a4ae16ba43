"""NaN origin: capture the first non-finite step, find where it started, save it.

Approach:

1. Graph side (`instrumentation.nan_capture.NanCapture`), inside the compiled
   train step: on the first non-finite step only, the batch and the weights
   before the update are copied into non-trainable variables. (In a custom
   loop, `instrumentation.monitor_nan` copies the weights in the optimizer's
   ``apply`` and the batch in ``StabilityMonitor.observe``.)
2. Host side, at the next read (every N steps, or at the end of training):
   `find_origin` re-runs that step eagerly with the captured weights (the
   forward pass and ``compute_loss``; for a custom ``train_step`` with a
   hand-written loss, that ``train_step`` with the update intercepted): inputs
   non-finite -> ``"inputs"``; else the first layer (in call completion
   order, so a child before its parent) whose output is non-finite ->
   ``"layer"``; else a non-finite loss with non-finite labels (or sample
   weights) -> ``"labels"`` (``"sample_weights"``), with finite ones ->
   ``"loss"``; else the variables with non-finite gradients ->
   ``"gradients"``; else ``"not_reproduced"``. For inputs, labels and sample
   weights the record says which batch rows hold the bad values
   (``"nonfinite_rows"``).
3. `save_artifacts` writes ``<run>/nan_origin/batch.npz`` (batch and
   weights), ``nan_origin.json`` and, when Keras can serialise the model,
   ``model.keras`` (holding the weights before the step), for
   ``tb-stability replay``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from instrumentation.graph_values import dense_values
from instrumentation.instance_patches import InstancePatches
from instrumentation.model_layers import all_layers

logger = logging.getLogger("instrumentation")

ARTIFACT_DIR = "nan_origin"


def rebuild(structure: dict, arrays: list):
    """Inverse of the flattening: the model input/label structure from arrays."""
    kind = structure.get("kind", "single")
    if kind == "none" or not arrays:
        return None
    if kind == "dict":
        return dict(zip(structure["keys"], arrays))
    if kind == "list":
        return list(arrays)
    return arrays[0]


def _finite(values) -> bool:
    for value in tf.nest.flatten(values):
        if value is None or not tf.is_tensor(value) and not isinstance(value, np.ndarray):
            continue
        value = tf.convert_to_tensor(value)
        if value.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(value))):
            return False
    return True


ROWS_LISTED = 10


def nonfinite_rows(values) -> list[dict]:
    """Where a batch part holds NaN/Inf, one entry per array that does.

    Args:
      values: One array, or a (nested) list or dict of them (a model's inputs
        or labels).

    Returns:
      ``[{"name", "rows" (the first ROWS_LISTED batch rows), "count" (rows),
      "of" (rows in the batch), "values" (non-finite values)}]``; ``name`` is the
      array's path of dict keys and list indices (``left``, ``0``, ``a/b``),
      ``""`` for a single array. Empty when all are finite.
    """
    found = []
    for path, value in keras.tree.flatten_with_path(values):
        name = "/".join(str(key) for key in path)
        if value is None or not tf.is_tensor(value) and not isinstance(value, np.ndarray):
            continue
        value = tf.convert_to_tensor(value)
        if not value.dtype.is_floating or value.shape.rank == 0:
            continue
        bad = ~np.asarray(tf.math.is_finite(value))
        if not bad.any():
            continue
        rows = np.flatnonzero(bad.reshape(len(bad), -1).any(axis=1))
        found.append({"name": str(name), "rows": [int(r) for r in rows[:ROWS_LISTED]],
                      "count": int(len(rows)), "of": int(len(bad)),
                      "values": int(bad.sum())})
    return found


def variable_path(variable) -> str:
    """A variable's path (``dense/kernel``) or name."""
    name = getattr(variable, "path", None) or getattr(variable, "name", "")
    return name[:-2] if name.endswith(":0") else name


def find_origin(model, x, y, sample_weight=None, via: str = "compute_loss",
                loss_fn: Any = None) -> dict:
    """Re-runs one training step eagerly and says where non-finite values start.

    The model's state other than its trainable weights (batch-norm statistics,
    metric totals, dropout seeds) is put back afterwards, so the replay adds
    nothing to what training will report.

    Args:
      model: A compiled Keras model holding the weights before the step.
      x, y, sample_weight: The batch.
      via: ``"compute_loss"``: the forward pass and ``model.compute_loss``
        (Keras' own train step); ``"train_step"``: the model class's own
        ``train_step`` on the packed batch, its ``optimizer.apply`` calls
        intercepted (no update is made) for the gradients, and its returned
        ``"loss"`` as the loss (a custom step with a hand-written loss);
        ``"loss_fn"``: the forward pass and ``loss_fn(y, y_pred)`` (a custom
        training loop: `StabilityMonitor`), or the forward pass alone where
        ``loss_fn`` or ``y`` is None (then only inputs and layers are tested).
      loss_fn: The loss callable of ``via="loss_fn"``.

    Returns:
      ``{"origin": "inputs"|"layer"|"labels"|"sample_weights"|"loss"|
      "gradients"|"not_reproduced", "layer", "variables", "loss",
      "layers_checked"}``, and ``"nonfinite_rows"`` (see `nonfinite_rows`)
      for ``inputs``, ``labels`` and ``sample_weights``.
    """
    result: dict[str, Any] = {"origin": "not_reproduced", "layer": None, "variables": [],
                              "loss": None}
    if not _finite(x):
        result["origin"] = "inputs"
        result["nonfinite_rows"] = nonfinite_rows(x)
        return result
    calls: list = []
    saved = []
    for layer in all_layers(model):
        original = layer.call

        def call(*args, __layer=layer, __original=original, **kwargs):
            out = __original(*args, **kwargs)
            calls.append((__layer.name, _finite(args[:1]), _finite(out)))
            return out

        saved.append((layer, "call" in vars(layer), vars(layer).get("call")))
        object.__setattr__(layer, "call", call)
    state = _model_state(model)
    try:
        if via == "train_step":
            loss, grads, variables = _replay_train_step(model, x, y, sample_weight)
            result["replay_with"] = "train_step"
        elif via == "loss_fn":
            loss, grads, variables = _replay_loss_fn(model, x, y, loss_fn)
            result["replay_with"] = "loss_fn"
            if loss is None:
                result["loss_replayed"] = False
        else:
            variables = list(model.trainable_variables)
            with tf.GradientTape() as tape:
                y_pred = model(x, training=True)
                loss = type(model).compute_loss(model, x=x, y=y, y_pred=y_pred,
                                                sample_weight=sample_weight, training=True)
            grads = tape.gradient(loss, variables)
    finally:
        for layer, had, old in reversed(saved):
            if had:
                object.__setattr__(layer, "call", old)
            else:
                object.__delattr__(layer, "call")
        for variable, value in state:
            variable.assign(value)
    result["layers_checked"] = len(calls)
    loss_value = 0.0  # a train_step that returned no loss: only layers and gradients are tested
    if loss is not None:
        loss_value = float(np.asarray(tf.reduce_sum(tf.cast(loss, tf.float64))))
        result["loss"] = loss_value if np.isfinite(loss_value) else str(loss_value)
    bad_layers = [name for name, _, ok in calls if not ok]
    if bad_layers:
        result["origin"] = "layer"
        result["layer"] = bad_layers[0]
        result["layer_input_finite"] = next(inp for name, inp, ok in calls if not ok)
        return result
    if not np.isfinite(loss_value):
        # A label is blamed only when it turned the loss non-finite: a loss
        # that masks missing (NaN) labels reaches this point with a finite loss.
        for part, values in (("labels", y), ("sample_weights", sample_weight)):
            rows = nonfinite_rows(values)
            if rows:
                result["origin"] = part
                result["nonfinite_rows"] = rows
                return result
        result["origin"] = "loss"
        return result
    bad_vars = [variable_path(v) for v, g in zip(variables, grads)
                if g is not None and not _finite(dense_values(g))]
    if bad_vars:
        result["origin"] = "gradients"
        result["variables"] = bad_vars
    return result


def _model_state(model) -> list:
    """``(variable, value)`` of the model's non-trainable and metric variables."""
    variables = list(getattr(model, "non_trainable_variables", []) or [])
    variables += list(getattr(model, "metrics_variables", []) or [])
    seen, state = set(), []
    for variable in variables:
        if id(variable) in seen:
            continue
        seen.add(id(variable))
        try:
            state.append((variable, tf.identity(variable.value)))
        except Exception:  # noqa: BLE001 - not built yet: nothing to put back
            continue
    return state


def _replay_loss_fn(model, x, y, loss_fn):
    """``(loss or None, gradients, variables)`` of ``loss_fn(y, model(x, training=True))``."""
    variables = list(model.trainable_variables)
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = loss_fn(y, y_pred) if loss_fn is not None and y is not None else None
    if loss is None:
        return None, [], []
    return loss, tape.gradient(loss, variables), variables


def loss_callable(loss: Any):
    """The callable of a loss given as a Keras name, a ``Loss`` or a function; None if unknown."""
    if loss is None:
        return None
    if isinstance(loss, str):
        try:
            return keras.losses.get(loss)
        except (ValueError, TypeError):
            return None
    return loss if callable(loss) else None


def loss_config(loss: Any) -> Any:
    """A Keras ``Loss`` instance's serialised config (``from_logits`` and all), else None."""
    if not isinstance(loss, keras.losses.Loss):
        return None
    try:
        return keras.losses.serialize(loss)
    except Exception:  # noqa: BLE001 - an unserialisable custom Loss: its name only
        return None


def loss_from_config(config: Any):
    """The loss `loss_config` serialised, or None."""
    if not config:
        return None
    try:
        return keras.losses.deserialize(config)
    except Exception:  # noqa: BLE001 - e.g. a custom class not registered here
        return None


def loss_label(loss: Any) -> Any:
    """What a record says the loss was: its Keras name where it has one, else a display name."""
    if loss is None or isinstance(loss, str):
        return loss
    name = getattr(loss, "__name__", None) or getattr(loss, "name", None)
    return str(name) if name else type(loss).__name__


def _replay_train_step(model, x, y, sample_weight):
    """``(loss or None, gradients, variables)`` of one eager call of the class's ``train_step``.

    The optimizer's ``apply`` is replaced on the instance for the call by one
    that keeps the gradients it is given and updates nothing.
    """
    optimizer = model.optimizer
    given: list = []

    def apply(grads, trainable_variables=None):
        variables = (list(trainable_variables) if trainable_variables is not None
                     else list(model.trainable_variables))
        given.extend(zip(list(grads), variables))

    patches = InstancePatches()
    patches.set(optimizer, "apply", apply)
    try:
        logs = type(model).train_step(model, keras.utils.pack_x_y_sample_weight(x, y, sample_weight))
    finally:
        patches.restore()
    loss = logs.get("loss") if isinstance(logs, dict) else None
    if loss is not None and not (tf.is_tensor(loss) or isinstance(loss, (float, np.ndarray))):
        loss = None
    return loss, [g for g, _ in given], [v for _, v in given]


class swapped_weights:
    """Context manager: assigns ``values`` to ``variables`` and restores them."""

    def __init__(self, variables, values):
        self.variables, self.values, self.saved = list(variables), list(values), []

    def __enter__(self):
        self.saved = [np.array(v.numpy()) for v in self.variables]
        for variable, value in zip(self.variables, self.values):
            variable.assign(value)
        return self

    def __exit__(self, *exc):
        for variable, value in zip(self.variables, self.saved):
            variable.assign(value)


def save_artifacts(directory: str, record: dict, batch: dict, names: Sequence[str],
                   weights: Sequence[np.ndarray], model=None) -> dict:
    """Writes ``batch.npz``, ``nan_origin.json`` and (when possible) ``model.keras``.

    ``model`` must currently hold the weights before the step. Returns the
    record with ``artifacts``/``model_file`` (and ``model_error``) filled in.
    """
    os.makedirs(directory, exist_ok=True)
    arrays = {f"{part}_{i}": np.asarray(a) for part in ("x", "y", "sw")
              for i, a in enumerate(batch.get(part, []))}
    arrays.update({f"w_{i}": np.asarray(w) for i, w in enumerate(weights)})
    np.savez_compressed(os.path.join(directory, "batch.npz"), **arrays)
    record = dict(record, artifacts=os.path.abspath(directory), weight_names=list(names))
    record["model_file"] = None
    if model is not None:
        path = os.path.join(directory, "model.keras")
        try:
            model.save(path)
            record["model_file"] = os.path.abspath(path)
        except Exception as error:  # noqa: BLE001 - e.g. unregistered custom objects
            record["model_error"] = f"{type(error).__name__}: {error}"[:300]
    with open(os.path.join(directory, "nan_origin.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2, default=str, sort_keys=True)
    return record


def save_and_report(log_dir: str, record: dict, batch: dict, names: Sequence[str],
                    weights: Sequence[np.ndarray], model=None) -> dict:
    """`save_artifacts` under ``<log_dir>/nan_origin/``, and the one warning that says where."""
    record = save_artifacts(os.path.join(log_dir, ARTIFACT_DIR), record, batch, names, weights,
                            model)
    logger.warning("tb-stability: non-finite values at step %d start at %s (saved to %s)",
                   record["step"], describe(record), record.get("artifacts"))
    return record


def load_artifacts(directory: str) -> tuple[dict, dict, list]:
    """``(record, batch, weights)`` from `save_artifacts`' files."""
    with open(os.path.join(directory, "nan_origin.json"), encoding="utf-8") as handle:
        record = json.load(handle)
    with np.load(os.path.join(directory, "batch.npz")) as data:
        files = dict(data)
    batch = {part: [files[f"{part}_{i}"] for i in range(len(files))
                    if f"{part}_{i}" in files] for part in ("x", "y", "sw")}
    weights = [files[f"w_{i}"] for i in range(len(record.get("weight_names", [])))]
    return record, batch, weights


def describe(origin: dict) -> str:
    """One line: ``origin=layer layer=div`` / ``origin=gradients variables=a,b``."""
    text = f"origin={origin.get('origin')}"
    if origin.get("layer"):
        text += f" layer={origin['layer']}"
    if origin.get("variables"):
        text += " variables=" + ",".join(origin["variables"][:8])
    for entry in origin.get("nonfinite_rows") or []:
        name = f" {entry['name']}" if entry.get("name") else ""
        text += f" rows{name}=" + ",".join(str(r) for r in entry["rows"])
        if entry["count"] > len(entry["rows"]):
            text += f",... ({entry['count']} of {entry['of']})"
    return text
