"""Training overhead of the working tree against an earlier revision, side by side.

    python benchmarks/versus.py --rev REV [--models mlp cnn lstm] [--blocks 12]
                                [--steps 100] [--batch 64] [--processes 3] [--quick]
                                [--markdown]

Did a change make the instrumentation cheaper? Two runs of `overhead_steps.py`
cannot say below a few percent: this VM's speed drifts between runs by more
than that (one session measured its baseline 25 % slower than the last).
Here the instrumentation package of revision ``REV`` (``git archive``) is
imported under another name beside the working tree's, and one process per
model trains, in lockstep and a random order every step, a baseline twice (A/A), the
callback at its defaults and with ``every=1`` from ``REV``, and the same from
the working tree. Every step goes through the installed ``train_function``
(the host reads and writes included); the Keras batch hooks, which neither
version overrides, are left out. Ratio = median over blocks of ``--steps``
steps of the block's time over the baseline's in the same block (the first
block, which traces, excluded).

Models built in one process differ in speed by a few percent for its whole
life, by the order they were built in (the A/A pair shows it). With
``--processes N`` (default 3) each model is measured in N fresh processes,
each building the configurations in a different (rotated) order: the ratio
printed is the median of the processes' ratios, with their range beside it.
A single process (``--processes 1``) once showed one change 3 % slower on
one model twice in a row, which rotated processes did not confirm.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (  # noqa: E402
    REPO, emit_result, format_table, machine_description, median, round_orders, run_worker,
)
from benchmarks.overhead import MODELS, _build_model, _data  # noqa: E402

PACKAGE = "instrumentation"
RENAMED = "instrumentation_rev"
CONFIGS = ("baseline", "baseline again", "rev defaults", "tree defaults",
           "rev every=1", "tree every=1")


def extract_revision(rev: str, into: str) -> str:
    """Writes revision ``rev``'s instrumentation package to ``into``/`RENAMED`; returns it."""
    archive = subprocess.run(["git", "archive", "--format=tar", rev, PACKAGE], cwd=REPO,
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    target = os.path.join(into, RENAMED)
    os.rename(os.path.join(into, PACKAGE), target)
    pattern = re.compile(rf"\b(from|import) {PACKAGE}\b")
    for name in os.listdir(target):
        if name.endswith(".py"):
            path = os.path.join(target, name)
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(pattern.sub(rf"\1 {RENAMED}", text))
    return target


def _callback(config: str, rev_module, tree_module):
    if config.startswith("baseline"):
        return None
    module = rev_module if config.startswith("rev") else tree_module
    kwargs = {"every": 1} if config.endswith("every=1") else {}
    return module.StabilityCallback(tempfile.mkdtemp(prefix="versus_"), **kwargs)


def measure(model_name: str, blocks: int, steps: int, batch: int, rev_dir: str,
            rotate: int = 0) -> dict:
    """Per configuration, the block times (seconds) of one model, in lockstep.

    Args:
      rotate: Build the models starting from configuration ``rotate``; also
        the seed of the steps' random orders.
    """
    import importlib

    import tensorflow as tf

    sys.path.insert(0, os.path.dirname(rev_dir))
    rev_module = importlib.import_module(RENAMED)
    tree_module = importlib.import_module(PACKAGE)
    x, y = _data(model_name, batch * 50)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).repeat()
    functions, iterators = {}, {}
    shift = rotate % len(CONFIGS)
    for config in CONFIGS[shift:] + CONFIGS[:shift]:
        model = _build_model(model_name, 0)
        model.make_train_function()
        callback = _callback(config, rev_module, tree_module)
        if callback is not None:
            callback.set_model(model)
            callback.on_train_begin()
        functions[config], iterators[config] = model.train_function, iter(dataset)
    times = {config: [] for config in CONFIGS}
    orders = round_orders(CONFIGS, seed=rotate)
    for block in range(blocks + 1):  # block 0 traces: excluded
        spent = dict.fromkeys(CONFIGS, 0.0)
        for step in range(steps):
            for config in next(orders):
                start = time.perf_counter()
                float(functions[config](iterators[config])["loss"])
                spent[config] += time.perf_counter() - start
        if block:
            for config in CONFIGS:
                times[config].append(spent[config])
    return times


def summarize(model_name: str, runs: list, steps: int) -> list[list[str]]:
    """Rows: model, config, median ms/step, ratio to the baseline, its range over processes.

    Args:
      runs: One `measure` result per process.
    """
    rows = []
    for config in CONFIGS:
        per_process = [median([t / b for t, b in zip(times[config], times["baseline"])])
                       for times in runs]
        ms = median([median(times[config]) for times in runs]) / steps * 1e3
        rows.append([model_name, config, f"{ms:.3f}", f"{median(per_process):.3f}",
                     " ".join(f"{r:.3f}" for r in per_process)])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="git revision to compare with")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--processes", type=int, default=None,
                        help="fresh processes per model, each building in another order "
                             "(default 3, 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="2 blocks of 3 steps (smoke test)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--rev-dir", help=argparse.SUPPRESS)
    parser.add_argument("--rotate", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.blocks, args.steps, args.batch = 2, 3, 16
    if args.processes is None:
        args.processes = 1 if args.quick else 3
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.worker:
        emit_result(measure(args.worker, args.blocks, args.steps, args.batch, args.rev_dir,
                            args.rotate))
        return 0
    print(f"machine: {machine_description()}")
    print(f"rev: {args.rev}  processes={args.processes} blocks={args.blocks} (+1 excluded) "
          f"steps/block={args.steps} batch={args.batch}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="versus_rev_") as workdir:
        rev_dir = extract_revision(args.rev, workdir)
        for model_name in args.models:
            runs = [run_worker([os.path.abspath(__file__), "--rev", args.rev,
                                "--worker", model_name, "--rev-dir", rev_dir,
                                "--blocks", str(args.blocks), "--steps", str(args.steps),
                                "--batch", str(args.batch), "--rotate", str(process)])
                    for process in range(max(1, args.processes))]
            rows += summarize(model_name, runs, args.steps)
    print(format_table(("model", "config", "median ms/step", "ratio", "per process"), rows,
                       markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
