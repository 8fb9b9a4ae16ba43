"""Helpers for the instrumentation tests: read event files, build tiny models.

Reads event files with TensorBoard's own loader (independent of the
project's reader) so the instrumentation tests check the raw contract.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402

from tb_stability import schema  # noqa: E402

Event = collections.namedtuple("Event", "step value content")


def read_events(log_dir) -> dict:
    """All stability summaries under ``log_dir``: ``{(run, tag): [Event, ...]}``."""
    found = collections.defaultdict(list)
    for root, _, files in os.walk(str(log_dir)):
        run = os.path.relpath(root, str(log_dir)).replace(os.sep, "/")
        for name in sorted(files):
            if "tfevents" not in name:
                continue
            for event in EventFileLoader(os.path.join(root, name)).Load():
                for value in event.summary.value:
                    content = schema.parse_content(value.metadata.plugin_data.content) \
                        if value.metadata.plugin_data.plugin_name == schema.PLUGIN_NAME else None
                    found[(run, value.tag)].append(
                        Event(event.step, tensor_util.make_ndarray(value.tensor), content)
                    )
    return dict(found)


def step_rows(events: dict, run: str = ".") -> np.ndarray:
    """Concatenated ``stability/steps`` rows of a run, in file order."""
    blocks = [e.value for e in events.get((run, schema.TAG_STEPS), [])]
    return np.concatenate(blocks) if blocks else np.zeros([0, len(schema.STEP_COLUMNS)])


def column(rows: np.ndarray, name: str) -> np.ndarray:
    return rows[:, schema.STEP_COLUMNS.index(name)]


def var_vectors(events: dict, quantity: str, run: str = ".") -> dict:
    """``{step: vector}`` of a per-variable quantity."""
    return {e.step: e.value for e in events.get((run, schema.variable_tag(quantity)), [])}


def run_infos(events: dict, run: str = ".") -> list:
    return [json.loads(e.value.item()) for e in events.get((run, schema.TAG_RUN_INFO), [])]


def data(n=48, features=4, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, features).astype("float32")
    w = rng.randn(features, 1).astype("float32")
    y = (x @ w + 0.1 * rng.randn(n, 1)).astype("float32")
    return x, y


def _init(seed):
    return keras.initializers.GlorotUniform(seed=seed)


class ManualStep(keras.Model):
    """A train step that calls neither ``compute_loss`` nor ``scale_loss``."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self(x, training=True) - y))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        return {"loss": loss}


class Subclassed(keras.Model):
    """A subclassed two-layer MLP (built lazily, inside the first train step)."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(5, activation="tanh", kernel_initializer=_init(1),
                                         bias_initializer="ones")
        self.out = keras.layers.Dense(1, kernel_initializer=_init(2))

    def call(self, inputs):
        return self.out(self.hidden(inputs))


def make_model(kind: str, features: int = 4) -> "keras.Model":
    """A tiny deterministic MLP: ``sequential``, ``functional`` or ``subclassed``."""
    if kind == "subclassed":
        return Subclassed()
    hidden = keras.layers.Dense(5, activation="tanh", kernel_initializer=_init(1),
                                bias_initializer="ones")
    out = keras.layers.Dense(1, kernel_initializer=_init(2))
    if kind == "sequential":
        return keras.Sequential([keras.Input((features,)), hidden, out])
    inputs = keras.Input((features,))
    return keras.Model(inputs, out(hidden(inputs)))


def reference_run(x, y, lr, batch_size, steps, features=4):
    """Manual GradientTape + SGD on an identical model; per-step float64 stats.

    Returns:
      dict with ``loss``, ``grad_norm`` ([steps]), ``var_grad``, ``var_weight``,
      ``var_ratio`` ([steps, num_vars]) and ``names``.
    """
    model = make_model("functional", features)
    loss_fn = keras.losses.MeanSquaredError()
    out = collections.defaultdict(list)
    for step in range(steps):
        xb = x[step * batch_size:(step + 1) * batch_size]
        yb = y[step * batch_size:(step + 1) * batch_size]
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        variables = model.trainable_variables
        grads = tape.gradient(loss, variables)
        g64 = [np.asarray(g, np.float64) for g in grads]
        w64 = [np.asarray(v, np.float64) for v in variables]
        out["loss"].append(float(loss))
        out["grad_norm"].append(np.sqrt(sum((g ** 2).sum() for g in g64)))
        out["var_grad"].append([np.linalg.norm(g) for g in g64])
        out["var_weight"].append([np.linalg.norm(w) for w in w64])
        for v, g in zip(variables, grads):
            v.assign(v - lr * g)
        after = [np.asarray(v, np.float64) for v in variables]
        out["var_ratio"].append([np.linalg.norm(a - w) / np.linalg.norm(w) if np.linalg.norm(w) else 0.0
                                 for a, w in zip(after, w64)])
    result = {k: np.asarray(v, np.float64) for k, v in out.items()}
    result["weights"] = [np.asarray(v) for v in model.trainable_variables]
    return result
