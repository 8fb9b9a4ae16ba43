"""StabilityMonitor in a hand-written GradientTape loop (optionally XLA-compiled).

    python examples/custom_loop.py --logdir runs/custom_loop [--xla]
    tb-stability report runs/custom_loop
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def main(logdir: str, steps: int = 24, every: int = 4, xla: bool = False) -> None:
    """Trains a tiny regression MLP for ``steps`` steps, logging to ``logdir``."""
    import keras
    import tensorflow as tf

    from instrumentation import StabilityMonitor

    rng = np.random.RandomState(0)
    x = rng.randn(steps * 8, 4).astype("float32")
    y = (x @ rng.randn(4, 1) + 0.1 * rng.randn(steps * 8, 1)).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1)])
    optimizer = keras.optimizers.Adam(1e-2)
    loss_fn = keras.losses.MeanSquaredError()
    # model=: its activations are probed in training passes; loss=: findings name it.
    monitor = StabilityMonitor(logdir, every=every, optimizer=optimizer, jit_compile=xla,
                               model=model, loss=loss_fn)

    @tf.function(jit_compile=xla)
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            pred = model(xb, training=True)
            loss = loss_fn(yb, pred)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        monitor.observe(loss, grads, model.trainable_variables,  # graph side, XLA-safe
                        inputs=xb, labels=yb, predictions=pred)  # the batch's statistics
        return loss

    with monitor:  # flushes and closes on exit, also when training raises
        for i in range(steps):
            train_step(x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8])
            monitor.tick()  # host side: reads the statistics every `every` steps


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--logdir", default="runs/custom_loop")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--xla", action="store_true")
    args = parser.parse_args()
    main(args.logdir, args.steps, xla=args.xla)
