"""MultiWorkerMirroredStrategy with StabilityCallback, two local workers on loopback.

    python examples/multi_worker.py --logdir runs/multi_worker          # launcher
    TF_CONFIG=... python examples/multi_worker.py --worker --logdir ...   # one worker

The launcher starts two worker processes with ``TF_CONFIG`` on free loopback
ports and kills both if they overrun ``--timeout`` seconds. Every worker passes
the same ``log_dir``; only the chief (worker 0) writes there.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GLOBAL_BATCH = 16


def worker(logdir: str, steps: int, every: int) -> None:
    """One worker: reads TF_CONFIG, trains a custom loop with StabilityMonitor.

    (``model.fit`` under MultiWorkerMirroredStrategy failed in Keras 3.15 on CPU
    with "Attempt to convert a value (PerReplica...)" even without any
    callback, so this example uses a custom loop.)
    """
    import numpy as np
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras

    from instrumentation import StabilityMonitor

    rng = np.random.RandomState(0)
    x = rng.randn(steps * GLOBAL_BATCH, 4).astype("float32")
    y = (x @ rng.randn(4, 1)).astype("float32")
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                                  keras.layers.Dense(1)])
        optimizer = keras.optimizers.SGD(0.05)
    monitor = StabilityMonitor(logdir, every=every, optimizer=optimizer, strategy=strategy)
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


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def launch(logdir: str, steps: int = 4, every: int = 2, timeout: float = 120.0) -> list[int]:
    """Runs two workers to completion; returns their exit codes (-9 when killed)."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", "--logdir", logdir,
             "--steps", str(steps), "--every", str(every)], env=env, cwd=REPO))
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for other in procs:
                if other.poll() is None:
                    other.kill()
            codes.append(-9)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return codes


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--logdir", default="runs/multi_worker")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args.logdir, args.steps, args.every)
    else:
        sys.exit(max(abs(c) for c in launch(args.logdir, args.steps, args.every, args.timeout)))
