"""Overhead benchmark: what `StabilityCallback` costs ``model.fit``, beside its peers.

    python benchmarks/overhead.py [--models mlp cnn lstm] [--reps 5] [--epochs 6]
                                  [--steps 100] [--batch 64] [--quick] [--markdown]

For each model (an MLP of 6 x Dense(256), a small CNN, an LSTM; CPU, synthetic
data made here) one worker subprocess fits a fresh model under every
configuration, interleaved across repetitions (each round runs every
configuration once, in a seeded random order):

* ``baseline``: ``model.fit`` without any callback;
* ``stability defaults``: ``StabilityCallback(dir)`` (``every=100``);
* ``stability every=1``: ``StabilityCallback(dir, every=1)`` (every quantity every step);
* ``tensorboard hist+batch``: ``keras.callbacks.TensorBoard(histogram_freq=1,
  update_freq="batch")``;
* ``tf debug dump``: ``tf.debugging.experimental.enable_dump_debug_info(dir,
  tensor_debug_mode="CONCISE_HEALTH", circular_buffer_size=-1)``, enabled just
  before that fit and disabled right after (it is global).

Steady-state step time of one fit: the *median over epochs* (the first epoch,
which traces, excluded) of each epoch's wall time divided by its steps,
measured by a callback placed after all others (so other callbacks' epoch-end
work, e.g. histograms, counts). An epoch of 100 steps holds exactly one host
read of the defaults (``every=100``), so its cost is inside every epoch; the
median over epochs drops epochs hit by a burst of load from other tenants of a
shared machine. Per configuration the table gives the median over
repetitions, the *paired ratio* (median over rounds of the configuration's
value divided by the baseline's value of the same round: this is the number
the goals are checked against) and the range of those per-round ratios. The
"baseline again" row is an A/A comparison: its distance from 1.000 is the
noise floor of the machine the table was measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (  # noqa: E402
    emit_result, fmt, format_table, interleaved, machine_description, median, run_worker,
)

# "baseline again" is the same fit as "baseline": its ratio is the noise floor of
# this machine (an A/A comparison), against which the other ratios are read.
CONFIGS = ("baseline", "baseline again", "stability defaults", "stability no probes",
           "stability every=1", "tensorboard hist+batch", "tf debug dump")
MODELS = ("mlp", "cnn", "lstm")
GOALS = {"stability defaults": 1.02, "stability every=1": 1.10}


# ----------------------------------------------------------------- worker


def _build_model(name: str, seed: int, jit_compile="auto"):
    """One of `MODELS`, compiled with Adam; ``jit_compile`` as in ``Model.compile``.

    Keras' ``"auto"`` compiles the step with XLA where a GPU is present and not
    on a CPU-only machine; ``True`` forces XLA (the path GPU users get by default).
    """
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    if name == "mlp":
        inputs = keras.Input((64,))
        x = inputs
        for _ in range(6):
            x = layers.Dense(256, activation="relu")(x)
    elif name == "cnn":
        inputs = keras.Input((28, 28, 1))
        x = layers.Conv2D(16, 3, activation="relu")(inputs)
        x = layers.MaxPooling2D()(x)
        x = layers.Conv2D(32, 3, activation="relu")(x)
        x = layers.MaxPooling2D()(x)
        x = layers.Flatten()(x)
        x = layers.Dense(64, activation="relu")(x)
    elif name == "lstm":
        inputs = keras.Input((20, 16))
        x = layers.LSTM(64)(inputs)
    else:
        raise ValueError(f"unknown model {name!r}")
    outputs = layers.Dense(10)(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit_compile)
    return model


def _data(name: str, n: int):
    import numpy as np

    rng = np.random.default_rng(0)
    shape = {"mlp": (64,), "cnn": (28, 28, 1), "lstm": (20, 16)}[name]
    x = rng.normal(size=(n, *shape)).astype("float32")
    y = rng.integers(0, 10, size=n).astype("int32")
    return x, y


def _fit_once(model_name: str, config: str, x, y, args, workdir: str, seed: int) -> float:
    """Fits a fresh model under ``config``; returns steady-state ms per step."""
    import keras
    import tensorflow as tf

    from instrumentation import StabilityCallback

    keras.backend.clear_session()
    model = _build_model(model_name, seed)
    run_dir = tempfile.mkdtemp(dir=workdir)
    callbacks = []
    if config == "stability defaults":
        callbacks.append(StabilityCallback(run_dir))
    elif config == "stability no probes":
        callbacks.append(StabilityCallback(run_dir, probe_every=0, nan_forensics=False))
    elif config == "stability every=1":
        callbacks.append(StabilityCallback(run_dir, every=1))
    elif config == "tensorboard hist+batch":
        callbacks.append(keras.callbacks.TensorBoard(run_dir, histogram_freq=1,
                                                     update_freq="batch"))
    ends: list[float] = []

    class EpochEnds(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if not ends:
                ends.append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            ends.append(time.perf_counter())

    callbacks.append(EpochEnds())
    debug = config == "tf debug dump"
    if debug:
        tf.debugging.experimental.enable_dump_debug_info(
            run_dir, tensor_debug_mode="CONCISE_HEALTH", circular_buffer_size=-1)
    try:
        model.fit(x, y, batch_size=args.batch, epochs=args.epochs, shuffle=False,
                  verbose=0, callbacks=callbacks)
    finally:
        if debug:
            tf.debugging.experimental.disable_dump_debug_info()
    shutil.rmtree(run_dir, ignore_errors=True)
    epoch_ms = [(b - a) / args.steps * 1000.0 for a, b in zip(ends, ends[1:])]
    return median(epoch_ms[1:])  # the first epoch traces


def worker(args) -> None:
    """Runs every configuration of one model, interleaved; emits the samples."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import warnings

    warnings.filterwarnings("ignore")
    x, y = _data(args.worker, args.steps * args.batch)
    samples = {c: [None] * args.reps for c in args.configs}
    workdir = tempfile.mkdtemp(prefix="tbs_overhead_")
    try:
        for rep, config in interleaved(args.configs, args.reps):
            samples[config][rep] = _fit_once(args.worker, config, x, y, args, workdir,
                                             seed=rep)
            print(f"  {args.worker} rep {rep} {config}: {samples[config][rep]:.3f} ms/step",
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    emit_result(samples)


# ------------------------------------------------------------------- main


def goal_verdict(config: str, ratio: float, goals: dict = GOALS) -> str:
    """"ok" or "MISS (goal <= x)" for a configuration with a goal in ``goals``, else ""."""
    goal = goals.get(config)
    if goal is None:
        return ""
    return "ok" if ratio <= goal else f"MISS (goal <= {goal})"


def peer_lines(model: str, ratios: dict, peers: Sequence[str], label: str,
               goals: dict = GOALS) -> list[str]:
    """Whether each configuration with a goal in ``goals`` is below every one of ``peers``."""
    peer_ratios = [ratios[c] for c in peers if c in ratios]
    return [f"{model}: {config} below {label}: "
            f"{'yes' if all(ratios[config] < p for p in peer_ratios) else 'NO'}"
            for config in goals if config in ratios and peer_ratios]


def round_ratios(values: list, base: list) -> list[float]:
    """Each round's value over the baseline's value of the same round."""
    return [v / b for v, b in zip(values, base) if v is not None and b]


def paired_ratios(samples: dict) -> dict:
    """Per configuration, the median of its per-round ratios to the baseline."""
    return {config: median(round_ratios(values, samples["baseline"]))
            for config, values in samples.items()}


def summarize(model: str, samples: dict) -> list[list[str]]:
    """Table rows of one model: config, median ms, paired ratio and its range, verdict."""
    rows = []
    for config, values in samples.items():
        rounds = round_ratios(values, samples["baseline"])
        paired = median(rounds)
        rows.append([model, config, fmt(median(values), 3), fmt(paired, 3),
                     f"{fmt(min(rounds), 3)}-{fmt(max(rounds), 3)}",
                     goal_verdict(config, paired)])
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--reps", type=int, default=5, help="repetitions per configuration")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per fit (first excluded)")
    parser.add_argument("--steps", type=int, default=100, help="steps per epoch")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes for the smoke test (1 rep, 2 epochs of 3 steps)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", metavar="PATH", help="also write the raw samples here")
    parser.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.epochs, args.steps, args.batch = 1, 2, 3, 8
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is excluded)")
    if "baseline" not in args.configs:
        args.configs.insert(0, "baseline")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    print(f"machine: {machine_description()}")
    print(f"sizes: reps={args.reps} epochs={args.epochs} (first excluded) "
          f"steps/epoch={args.steps} batch={args.batch}", flush=True)
    all_samples = {}
    rows = []
    for model in args.models:
        worker_args = [os.path.abspath(__file__), "--worker", model, "--reps", str(args.reps),
                       "--epochs", str(args.epochs), "--steps", str(args.steps),
                       "--batch", str(args.batch), "--configs", *args.configs]
        start = time.perf_counter()
        samples = run_worker(worker_args)
        print(f"  {model}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        all_samples[model] = samples
        rows += summarize(model, samples)
    headers = ("model", "config", "median step ms", "paired ratio", "per-round range", "goal")
    print(format_table(headers, rows, markdown=args.markdown))
    for model in args.models:
        for line in peer_lines(model, paired_ratios(all_samples[model]),
                               ("tensorboard hist+batch", "tf debug dump"), "both peers"):
            print(line)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(all_samples, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
