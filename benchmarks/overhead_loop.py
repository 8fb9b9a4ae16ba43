"""Training overhead of `StabilityMonitor` in a custom ``tf.GradientTape`` loop.

    python benchmarks/overhead_loop.py [--models mlp cnn lstm] [--blocks 12] [--processes 3]
                                       [--steps 100] [--batch 64] [--jit-compile]
                                       [--quick] [--markdown]

The custom-loop counterpart of `overhead_steps.py`, with the same harness:
one process holds one model (and optimizer) per configuration, each with its
own ``tf.function`` train step as the README's custom-loop example writes it
(forward pass under a tape, ``tape.gradient``, ``optimizer.apply_gradients``,
then ``monitor.observe``), and steps all of them in lockstep, a random order
per step. A block is ``--steps`` steps; the ratio of a configuration is the
median over blocks of its block time over the baseline's in the same block,
and the median of that over ``--processes`` fresh processes (each building
the models in a rotated order). Every step is followed by ``monitor.tick()``
where there is a monitor and by the same host read of the loss for all.

Configurations (the models, data and optimizer of `overhead.py`):

- ``baseline`` and ``baseline again`` (A/A): the loop without a monitor.
- ``monitor defaults``: ``StabilityMonitor(run_dir, optimizer=, model=,
  loss=)`` at its defaults (``every=100``; activation probes and batch
  statistics every 100 steps), ``observe`` given the batch's inputs, labels
  and predictions: everything the README's example records.
- ``monitor no probes``: the per-step row and the per-variable vectors only
  (no ``model=``, no batch, ``probe_every=0``).
- ``monitor every=1``: the defaults with ``every=1``: per-variable vectors,
  probes and batch statistics at every step.
- ``monitor defaults, no NaN capture`` (only with ``--configs``): the
  defaults with ``nan_forensics=False``, to measure the capture's cost.
- ``tf.summary hist every step``: the hand-written alternative, a
  ``tf.summary.histogram`` of every gradient and weight and a
  ``tf.summary.scalar`` of the loss inside the step, every step.

The goals of `overhead.py` (defaults <= 1.02, everything every step <= 1.10)
are applied to the monitor's configurations alike.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import emit_result  # noqa: E402
from benchmarks.overhead import _build_model, _data  # noqa: E402
from benchmarks.overhead_steps import (  # noqa: E402
    lockstep_args, lockstep_blocks, lockstep_main, lockstep_parser, quiet_worker,
)

CONFIGS = ("baseline", "baseline again", "monitor defaults", "monitor no probes",
           "monitor every=1", "tf.summary hist every step")
NO_CAPTURE = "monitor defaults, no NaN capture"
EXTRA_CONFIGS = (NO_CAPTURE,)
"""Run only when asked for with ``--configs``."""
GOALS = {"monitor defaults": 1.02, "monitor every=1": 1.10}
PEER = "tf.summary hist every step"
WITH_BATCH = {"monitor defaults", "monitor every=1", NO_CAPTURE}
"""Configurations whose ``observe`` is given the batch's inputs, labels and predictions."""


def _monitor(config: str, run_dir: str, model, optimizer, jit_compile: bool):
    from instrumentation import StabilityMonitor

    loss = model.loss
    if config == "monitor defaults":
        return StabilityMonitor(run_dir, optimizer=optimizer, model=model, loss=loss,
                                jit_compile=jit_compile)
    if config == NO_CAPTURE:
        return StabilityMonitor(run_dir, optimizer=optimizer, model=model, loss=loss,
                                jit_compile=jit_compile, nan_forensics=False)
    if config == "monitor no probes":
        return StabilityMonitor(run_dir, optimizer=optimizer, probe_every=0,
                                jit_compile=jit_compile)
    if config == "monitor every=1":
        return StabilityMonitor(run_dir, every=1, optimizer=optimizer, model=model,
                                loss=loss, jit_compile=jit_compile)
    return None


class _CustomLoop:
    """One configuration's model, optimizer, train step and data iterator."""

    def __init__(self, model_name: str, config: str, x, y, batch: int, workdir: str,
                 jit_compile: bool = False):
        import tensorflow as tf

        model = _build_model(model_name, seed=0)
        optimizer = model.optimizer
        loss_fn = model.loss
        run_dir = tempfile.mkdtemp(dir=workdir)
        self.monitor = _monitor(config, run_dir, model, optimizer, jit_compile)
        monitor, with_batch = self.monitor, config in WITH_BATCH
        self.writer = tf.summary.create_file_writer(run_dir) if config == PEER else None
        writer = self.writer
        variables = model.trainable_variables
        optimizer.build(variables)

        @tf.function(jit_compile=jit_compile)
        def train_step(xb, yb):
            with tf.GradientTape() as tape:
                predictions = model(xb, training=True)
                loss = loss_fn(yb, predictions)
            grads = tape.gradient(loss, variables)
            optimizer.apply_gradients(zip(grads, variables))
            if monitor is not None:
                batch_kwargs = ({"inputs": xb, "labels": yb, "predictions": predictions}
                                if with_batch else {})
                monitor.observe(loss, grads, variables, **batch_kwargs)
            if writer is not None:
                step = optimizer.iterations
                with writer.as_default(step=step):
                    tf.summary.scalar("loss", loss)
                    for grad, variable in zip(grads, variables):
                        tf.summary.histogram(f"grad/{variable.path}", grad)
                        tf.summary.histogram(f"weight/{variable.path}", variable)
            return loss

        self.train_step = train_step
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).repeat()
        self.iterator = iter(dataset)

    def run_step(self) -> float:
        start = time.perf_counter()
        loss = self.train_step(*next(self.iterator))
        if self.monitor is not None:
            self.monitor.tick()
        float(loss)  # same host sync for every configuration
        return time.perf_counter() - start

    def epoch(self, epoch: int, begin: bool) -> float:
        """A custom loop has no epoch hooks: nothing is timed between blocks."""
        return 0.0

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
        if self.writer is not None:
            self.writer.close()


def worker(args) -> None:
    """Steps every configuration of one model in lockstep; emits block times (s)."""
    quiet_worker()
    x, y = _data(args.worker, args.steps * args.batch)

    def make_loop(config, workdir):
        return _CustomLoop(args.worker, config, x, y, args.batch, workdir, args.jit_compile)

    emit_result(lockstep_blocks(args, list(args.configs), make_loop, "tbs_overhead_loop_"))


def parse_args(argv=None):
    parser = lockstep_parser(__doc__.splitlines()[0], CONFIGS, EXTRA_CONFIGS)
    parser.add_argument("--jit-compile", action="store_true",
                        help="compile every train step with XLA (tf.function(jit_compile=True))")
    return lockstep_args(parser, argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    return lockstep_main(__file__, args, ["--jit-compile"] if args.jit_compile else [], GOALS,
                         PEER, "hand-written tf.summary histograms")


if __name__ == "__main__":
    sys.exit(main())
