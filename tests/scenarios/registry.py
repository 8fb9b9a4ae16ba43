"""The scenario registry: one broken program per failure mode and its fixed twin.

Every program follows a seed article (named in `Scenario.seed`), made small
and deterministic so the whole matrix trains in well under three minutes on two
CPU cores. Each `train(log_dir, fixed)` function trains with a
`StabilityCallback` writing into `log_dir`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from instrumentation import StabilityCallback  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One failure mode from the seed articles.

    Attributes:
      name: Short id, also the run directory name.
      kinds: Finding kinds that count as a correct diagnosis (first = primary).
      seed: Which seed article and example it reproduces.
      description: One line on what is broken and what the fix is.
      train: ``train(log_dir, fixed)`` trains the broken (``fixed=False``) or
        the fixed program, writing stability summaries into ``log_dir``.
      onset_step: Step at which the problem starts, when it is known by
        construction (used to measure detection delay); ``"first_nonfinite"``
        for the first step whose raw loss is non-finite; else None.
      remedy_says: Text the diagnosis's remedy must contain (it names what
        this program got wrong), or "" when any remedy of the kind will do.
    """

    name: str
    kinds: tuple[str, ...]
    seed: str
    description: str
    train: Callable[[str, bool], None]
    onset_step: int | str | None = None
    remedy_says: str = ""


EVERY = 5


def _callback(log_dir: str) -> StabilityCallback:
    return StabilityCallback(log_dir, every=EVERY)


def _mlp(inputs: int, hidden: list[int], activation, output_units=1, output_activation=None):
    layers = [keras.Input((inputs,))]
    layers += [keras.layers.Dense(units, activation=activation) for units in hidden]
    layers.append(keras.layers.Dense(output_units, activation=output_activation))
    return keras.Sequential(layers)


def _rng(seed: int = 0) -> np.random.Generator:
    keras.utils.set_random_seed(seed)
    return np.random.default_rng(seed)


def exploding_gradients(log_dir: str, fixed: bool) -> None:
    """Seed 003 example 1: a deep ReLU MLP without clipping, learning rate too high."""
    rng = _rng()
    x = rng.standard_normal((1000, 10)).astype("float32")
    y = (x @ rng.standard_normal((10, 1)) * 10).astype("float32")
    model = _mlp(10, [64, 64, 64, 64], "relu")
    if fixed:
        optimizer = keras.optimizers.Adam(learning_rate=1e-3, clipnorm=1.0)
    else:
        optimizer = keras.optimizers.SGD(learning_rate=2e-3, momentum=0.9)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[_callback(log_dir)])


def _squashed_tanh(x):
    return tf.math.tanh(x * 0.01)


def vanishing_gradients(log_dir: str, fixed: bool) -> None:
    """Seed 001 example 2: the custom activation ``tanh(0.01 x)``, stacked three deep."""
    rng = _rng()
    x = rng.random((256, 10)).astype("float32")
    y = rng.random((256, 1)).astype("float32")
    model = _mlp(10, [16, 16, 16], "relu" if fixed else _squashed_tanh)
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=8, batch_size=32, verbose=0, callbacks=[_callback(log_dir)])


def unscaled_inputs(log_dir: str, fixed: bool) -> None:
    """Seed 003 example 3 / seed 001 example 1: features x1000, no StandardScaler."""
    rng = _rng()
    x = (rng.random((512, 10)) * 1000).astype("float32")
    x[:, 1] *= 1000  # one feature a thousand times larger still (seed 001)
    y = (rng.random((512, 1)) > 0.5).astype("float32")
    if fixed:
        x = (x - x.mean(axis=0)) / x.std(axis=0)
    model = _mlp(10, [128, 64], "relu", output_activation="sigmoid")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    model.fit(x, y, epochs=4, batch_size=32, verbose=0, callbacks=[_callback(log_dir)])


def large_learning_rate(log_dir: str, fixed: bool) -> None:
    """Seed 001 example 3: Adam with learning rate 1.0 instead of 0.001."""
    rng = _rng()
    x = rng.random((100, 5)).astype("float32")
    y = rng.integers(0, 2, (100, 1)).astype("float32")
    model = _mlp(5, [16], "relu", output_activation="sigmoid")
    model.compile(optimizer=keras.optimizers.Adam(1e-3 if fixed else 1.0), loss="binary_crossentropy")
    model.fit(x, y, epochs=50, batch_size=32, verbose=0, callbacks=[_callback(log_dir)])


def _log_loss_unclipped(y_true, y_pred):
    return -tf.reduce_mean(y_true * tf.math.log(y_pred) + (1 - y_true) * tf.math.log(1 - y_pred))


def _log_loss_clipped(y_true, y_pred):
    y_pred = tf.clip_by_value(y_pred, 1e-7, 1 - 1e-7)
    return -tf.reduce_mean(y_true * tf.math.log(y_pred) + (1 - y_true) * tf.math.log(1 - y_pred))


def log_zero_nan(log_dir: str, fixed: bool) -> None:
    """Seed 003 example 2: a hand-written cross-entropy that takes ``log(0)``."""
    rng = _rng()
    x = rng.standard_normal((512, 10)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")
    model = _mlp(10, [16], "relu", output_activation="sigmoid")
    loss = _log_loss_clipped if fixed else _log_loss_unclipped
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=loss)
    model.fit(x, y, epochs=6, batch_size=32, verbose=0, callbacks=[_callback(log_dir)])


FINAL_SPIKE_STEPS = 160


def final_batch_outlier(log_dir: str, fixed: bool) -> None:
    """Seed 000 scenario 2: the very last batch of training is an outlier."""
    rng = _rng()
    batch = 32
    x = rng.random((FINAL_SPIKE_STEPS * batch, 10)).astype("float32")
    y = (x.sum(axis=1, keepdims=True) > 5).astype("float32")
    if not fixed:
        x[-batch:] *= 40.0  # a corrupted final batch
        y[-batch:] = 1.0 - y[-batch:]
    model = _mlp(10, [10], "relu", output_activation="sigmoid")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    model.fit(x, y, epochs=1, batch_size=batch, shuffle=False, verbose=0, callbacks=[_callback(log_dir)])


def overfitting(log_dir: str, fixed: bool) -> None:
    """Seed 002 example 1: too few samples for a large model; fix: more data, dropout."""
    rng = _rng()
    samples = 2000 if fixed else 120
    x = rng.standard_normal((samples, 20)).astype("float32")
    w = rng.standard_normal((20, 1))
    y = ((x @ w + rng.standard_normal((samples, 1)) * 2.0) > 0).astype("float32")
    layers = [keras.Input((20,)), keras.layers.Dense(256, activation="relu")]
    if fixed:
        layers.append(keras.layers.Dropout(0.5))
    layers += [keras.layers.Dense(256, activation="relu")]
    if fixed:
        layers.append(keras.layers.Dropout(0.5))
    layers.append(keras.layers.Dense(1, activation="sigmoid"))
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    callbacks = [_callback(log_dir)]
    if fixed:
        callbacks.append(keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True))
    model.fit(x, y, epochs=60 if not fixed else 15, batch_size=32, validation_split=0.3,
              verbose=0, callbacks=callbacks)


def class_imbalance(log_dir: str, fixed: bool) -> None:
    """Seed 001/002: 97% of labels in one class; fix: class weights."""
    rng = _rng()
    x = rng.standard_normal((1000, 8)).astype("float32")
    y = (rng.random((1000, 1)) < 0.03).astype("float32")
    x[y[:, 0] == 1] += 0.5
    model = _mlp(8, [16], "relu", output_activation="sigmoid")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    class_weight = {0: 0.5 / 0.97, 1: 0.5 / 0.03} if fixed else None
    model.fit(x, y, epochs=4, batch_size=32, verbose=0, class_weight=class_weight,
              callbacks=[_callback(log_dir)])


def small_learning_rate(log_dir: str, fixed: bool) -> None:
    """Seed 001: an extremely low learning rate leaves the model stuck."""
    rng = _rng()
    x = rng.standard_normal((512, 10)).astype("float32")
    y = (x @ rng.standard_normal((10, 1))).astype("float32")
    model = _mlp(10, [32, 32], "relu")
    optimizer = keras.optimizers.Adam(1e-3) if fixed else keras.optimizers.SGD(1e-7)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, epochs=5, batch_size=32, verbose=0, callbacks=[_callback(log_dir)])


def sigmoid_lstm(log_dir: str, fixed: bool) -> None:
    """Seed 002 example 2: LSTMs with ``activation='sigmoid'``; fix: relu + clipnorm.

    Stacked five deep: the sigmoid's derivative (at most 0.25) shrinks the
    gradient at every layer, which is what the article describes; a single
    layer trains about as well as the fix at this scale.
    """
    rng = _rng()
    x = rng.standard_normal((256, 30, 10)).astype("float32")
    # Five classes, as the article's classifier has: quintiles of a score that needs the
    # whole sequence (channel 0) and its last step (channel 1).
    score = x[:, :, 0].sum(axis=1) / np.sqrt(30) + 2 * x[:, -1, 1]
    labels = np.digitize(score, np.quantile(score, [0.2, 0.4, 0.6, 0.8]))
    y = keras.utils.to_categorical(labels, 5)
    activation = "relu" if fixed else "sigmoid"
    layers = [keras.Input((None, 10))]
    layers += [keras.layers.LSTM(32, activation=activation, return_sequences=i < 4) for i in range(5)]
    layers.append(keras.layers.Dense(5, activation="softmax"))
    model = keras.Sequential(layers)
    optimizer = keras.optimizers.Adam(1e-3, clipnorm=1.0) if fixed else keras.optimizers.Adam(1e-3)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    model.fit(x, y, epochs=3, batch_size=32, verbose=0, callbacks=[_callback(log_dir)])


def healthy_baseline(log_dir: str, fixed: bool) -> None:
    """A healthy run (seed 000 example 1's model with a step-decay schedule)."""
    del fixed
    rng = _rng()
    x = rng.random((600, 10)).astype("float32")
    y = (x[:, :3].sum(axis=1, keepdims=True) > 1.5).astype("float32")
    model = _mlp(10, [32, 16], "relu", output_activation="sigmoid")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    schedule = keras.callbacks.LearningRateScheduler(lambda epoch: 1e-3 * 0.5 ** (epoch // 5))
    model.fit(x, y, epochs=10, batch_size=32, verbose=0, callbacks=[_callback(log_dir), schedule])


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("exploding_gradients", ("exploding_gradients", "nan_inf"), "003 ex.1",
             "deep ReLU MLP, SGD lr 2e-3 momentum 0.9, no clipping; fix: Adam 1e-3 + clipnorm=1.0",
             exploding_gradients),
    Scenario("vanishing_gradients", ("vanishing_gradients",), "001 ex.2",
             "activation tanh(0.01 x) in three layers; fix: relu", vanishing_gradients, onset_step=0,
             remedy_says="activation='_squashed_tanh'"),
    Scenario("unscaled_inputs", ("unscaled_inputs",), "003 ex.3, 001 ex.1",
             "features x1000 (one x1e6); fix: standardize", unscaled_inputs, onset_step=0),
    Scenario("large_learning_rate", ("update_ratio_high", "divergence", "oscillation"), "001 ex.3",
             "Adam learning rate 1.0; fix: 1e-3", large_learning_rate, onset_step=0),
    Scenario("log_zero_nan", ("nan_inf",), "003 ex.2",
             "hand-written cross-entropy with log(0); fix: clip the probabilities", log_zero_nan,
             onset_step="first_nonfinite"),
    Scenario("final_batch_outlier", ("final_step_spike",), "000 scen.2",
             "corrupted last batch; fix: clean the data", final_batch_outlier,
             onset_step=FINAL_SPIKE_STEPS - 1),
    Scenario("overfitting", ("overfitting",), "002 ex.1",
             "120 samples, 2x256 MLP, 60 epochs; fix: more data, dropout, early stopping", overfitting),
    Scenario("class_imbalance", ("class_imbalance",), "001, 002",
             "97% of labels are 0; fix: class weights", class_imbalance, onset_step=0),
    Scenario("small_learning_rate", ("update_ratio_low", "stalled"), "001",
             "SGD learning rate 1e-7; fix: Adam 1e-3", small_learning_rate, onset_step=0),
    Scenario("sigmoid_lstm", ("saturated_activations", "vanishing_gradients"), "002 ex.2",
             "5 stacked LSTM(activation='sigmoid'); fix: relu + clipnorm", sigmoid_lstm,
             onset_step=0, remedy_says="the recurrence uses activation='sigmoid'"),
)

HEALTHY = Scenario("healthy_baseline", (), "000 ex.1", "a healthy run", healthy_baseline)


def run_scenario(scenario: Scenario, log_dir: str, fixed: bool) -> None:
    """Trains one scenario (broken or fixed) into ``log_dir``, seeded."""
    keras.backend.clear_session()
    scenario.train(log_dir, fixed)
