"""MirroredStrategy on two logical CPU devices, with `model.fit` and a custom loop.

    python examples/mirrored.py --logdir runs/mirrored

Writes two runs: ``fit`` (StabilityCallback) and ``custom_loop``
(StabilityMonitor inside ``strategy.run``). Statistics are aggregated over the
replicas (see instrumentation/distribute.py); ``--nan-replica 1`` puts a NaN
into the data only replica 1 sees at step 2, to show the ``nonfinite_replicas``
column. On GPUs, drop `split_cpu` and use ``MirroredStrategy()``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

GLOBAL_BATCH = 16


def split_cpu(n: int = 2) -> None:
    """Splits the CPU into ``n`` logical devices (must run before TF initialises)."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
    )


def data(steps: int, nan_replica=None, nan_step: int = 2):
    rng = np.random.RandomState(0)
    x = rng.randn(steps * GLOBAL_BATCH, 4).astype("float32")
    y = (x @ rng.randn(4, 1)).astype("float32")
    if nan_replica is not None:  # each global batch is split in halves, in order
        half = GLOBAL_BATCH // 2
        x[nan_step * GLOBAL_BATCH + nan_replica * half, 0] = np.nan
    return x, y


def make_model(keras):
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, activation="tanh", kernel_initializer=keras.initializers.GlorotUniform(1)),
        keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(2)),
    ])


def main(logdir: str, steps: int = 6, every: int = 2, nan_replica=None) -> None:
    """Trains both runs under a two-replica MirroredStrategy."""
    split_cpu(2)
    import keras
    import tensorflow as tf

    from instrumentation import StabilityCallback, StabilityMonitor

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x, y = data(steps, nan_replica)

    # 1. model.fit: build and compile inside the strategy scope, as usual.
    with strategy.scope():
        model = make_model(keras)
        model.compile(keras.optimizers.SGD(0.05), "mse")
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[StabilityCallback(os.path.join(logdir, "fit"), every=every)])

    # 2. custom loop: observe() inside strategy.run, with each replica's gradients.
    with strategy.scope():
        model = make_model(keras)
        optimizer = keras.optimizers.SGD(0.05)
    monitor = StabilityMonitor(os.path.join(logdir, "custom_loop"), every=every,
                               optimizer=optimizer, strategy=strategy)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    dist_dataset = strategy.experimental_distribute_dataset(dataset)

    def replica_step(xb, yb):
        with tf.GradientTape() as tape:
            per_example = tf.reduce_mean(tf.square(yb - model(xb, training=True)), axis=-1)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL_BATCH)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        monitor.observe(loss, grads, model.trainable_variables)
        return loss

    @tf.function
    def train_step(batch):
        return strategy.run(replica_step, args=batch)

    with monitor:
        for batch in dist_dataset:
            train_step(batch)
            monitor.tick()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--logdir", default="runs/mirrored")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--nan-replica", type=int, default=None)
    args = parser.parse_args()
    main(args.logdir, args.steps, nan_replica=args.nan_replica)
