"""Training overhead resolved to ~1 %: configurations interleaved step by step.

    python benchmarks/overhead_steps.py [--models mlp cnn lstm] [--blocks 12] [--processes 3]
                                        [--steps 100] [--batch 64] [--quick] [--markdown]
                                        [--switch MODULE.NAME=VALUE]

`overhead.py` times whole ``model.fit`` runs, one configuration after another;
on a shared machine the load changes between two fits by more than the 2 %
the defaults are allowed, so its ratios cannot resolve that goal. This script
runs ``model.fit``'s own loop (a ``keras.callbacks.CallbackList`` built as
``fit`` builds it, ``make_train_function`` then ``on_train_begin``, then per
step ``on_train_batch_begin``, ``train_function``, ``on_train_batch_end``,
and ``on_epoch_begin``/``on_epoch_end`` around every block) for every
configuration *at once* in one process: one model per configuration, and
step ``s`` of every configuration runs before step ``s + 1`` of any (in a new
random order every step: `benchmarks._common.round_orders`). A burst of load
therefore hits all configurations alike.

A block is ``--steps`` steps (100: exactly one host read of the defaults,
``every=100``, and one epoch end, where the Keras TensorBoard callback writes
its histograms). Per block and configuration the wall time of its steps and
epoch hooks is summed; the ratio of a configuration is the median over blocks
of its block time divided by the baseline's block time of the same block.
The first block (tracing) is excluded. "baseline again" is an A/A control.

Two identical models in one process can differ in speed by several percent
for the whole life of the process (where their buffers landed, the order they
were built in). So the measurement is repeated in ``--processes`` fresh
processes, each building the models in a different (rotated) order; the
ratio reported is the median over the processes' medians, and the range of
the per-process medians is printed beside it.
TensorFlow's debugger dump is global (it instruments every function traced
while it is on), so it cannot be interleaved: `overhead.py` measures it.

``--switch MODULE.NAME=VALUE`` adds, beside every stability configuration,
the same configuration with the module constant ``MODULE.NAME`` set to the
Python literal ``VALUE`` while its train functions are traced (set around
that model's first `SWITCH_STEPS` steps only). That compares two behaviours
of *one* package in one process, e.g. a change that a constant can turn off
(``instrumentation.probe_state.LARGE_EXAMPLE=1000000000`` restores the
centred moments for every layer). `versus.py` compares two revisions
instead, but imports the old one under another name, and two imports of the
same code measured up to ~2 points apart.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (  # noqa: E402
    emit_result, fmt, format_table, machine_description, median, round_orders, run_worker,
)
from benchmarks.overhead import (  # noqa: E402
    GOALS, MODELS, _build_model, _data, goal_verdict, paired_ratios, peer_lines,
)

CONFIGS = ("baseline", "baseline again", "stability defaults", "stability no probes",
           "stability every=1", "tensorboard hist+batch")
SWITCH_STEPS = 3
"""Steps of a switched configuration run with its constant set: the defaults trace
their log-step function at step 0 and their other function at step 1."""


def parse_switch(text: str) -> tuple[str, str, object]:
    """``"package.module.NAME=VALUE"`` as ``(module, name, value)`` (VALUE: a Python literal).

    Raises:
      ValueError: Not of that form, or the value is not a literal.
    """
    target, sep, literal = text.partition("=")
    module, dot, name = target.strip().rpartition(".")
    if not sep or not dot or not module or not name.isidentifier():
        raise ValueError(f"--switch wants MODULE.NAME=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(literal.strip())
    except (ValueError, SyntaxError) as error:
        raise ValueError(f"--switch value is not a Python literal: {literal!r}") from error
    return module, name, value


def switched_configs(configs, switch: str | None) -> list[str]:
    """``configs`` plus, with a switch, ``"<config> [<switch>]"`` per stability config."""
    configs = list(configs)
    if switch:
        configs += [f"{c} [{switch}]" for c in configs if c.startswith("stability")]
    return configs


@contextlib.contextmanager
def _constant(module: str, name: str, value):
    target = importlib.import_module(module)
    if not hasattr(target, name):
        raise AttributeError(f"{module} has no attribute {name!r}")
    before = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, before)


def _callbacks(config: str, run_dir: str) -> list:
    import keras

    from instrumentation import StabilityCallback

    if config == "stability defaults":
        return [StabilityCallback(run_dir)]
    if config == "stability no probes":
        return [StabilityCallback(run_dir, probe_every=0, nan_forensics=False)]
    if config == "stability every=1":
        return [StabilityCallback(run_dir, every=1)]
    if config == "tensorboard hist+batch":
        return [keras.callbacks.TensorBoard(run_dir, histogram_freq=1, update_freq="batch")]
    return []


class _Loop:
    """One configuration's model, callbacks and data iterator, stepped by hand like fit."""

    def __init__(self, model_name: str, config: str, x, y, batch: int, workdir: str,
                 switch: str | None = None, jit_compile="auto"):
        import keras
        import tensorflow as tf

        self.switch = None
        if switch and config.endswith(f" [{switch}]"):
            config = config[:-len(f" [{switch}]")]
            self.switch = parse_switch(switch)
        self.model = _build_model(model_name, seed=0, jit_compile=jit_compile)
        run_dir = tempfile.mkdtemp(dir=workdir)
        self.callbacks = keras.callbacks.CallbackList(
            _callbacks(config, run_dir), add_history=False, add_progbar=False,
            model=self.model, epochs=10**6, steps=None, verbose=0)
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).repeat()
        self.iterator = iter(dataset)
        self.model.stop_training = False
        self.model.make_train_function()
        self.callbacks.on_train_begin()
        self.step = 0
        self.logs = None

    def run_step(self) -> float:
        if self.switch is not None and self.step < SWITCH_STEPS:
            with _constant(*self.switch):  # set while this model's functions trace
                return self._timed_step()
        return self._timed_step()

    def _timed_step(self) -> float:
        start = time.perf_counter()
        self.callbacks.on_train_batch_begin(self.step)
        self.logs = self.model.train_function(self.iterator)
        self.callbacks.on_train_batch_end(self.step, self.logs)
        float(self.logs["loss"])  # same host sync for every configuration
        self.step += 1
        return time.perf_counter() - start

    def epoch(self, epoch: int, begin: bool) -> float:
        start = time.perf_counter()
        if begin:
            self.callbacks.on_epoch_begin(epoch)
        else:
            self.callbacks.on_epoch_end(epoch, {k: float(v) for k, v in self.logs.items()})
        return time.perf_counter() - start

    def close(self) -> None:
        self.callbacks.on_train_end()


def lockstep_blocks(args, configs, make_loop, prefix: str) -> dict:
    """Steps one loop per configuration in lockstep; returns config -> block times (s).

    A throwaway loop is built and stepped first (whatever the first model of a
    process pays once, kernel and allocator warm-up, is not charged to the
    baseline); the loops are built in an order rotated by ``args.rotate`` and
    stepped in a random order per step. Block 0 (tracing) is not returned.

    Args:
      args: ``blocks``, ``steps``, ``rotate`` and ``worker`` (the model's name).
      configs: The configurations.
      make_loop: ``make_loop(config, workdir)`` -> an object with ``run_step()``,
        ``epoch(block, begin)`` (seconds each) and ``close()``.
      prefix: Prefix of the temporary directory the runs write to.
    """
    workdir = tempfile.mkdtemp(prefix=prefix)
    try:
        make_loop("baseline", workdir).run_step()
        shift = args.rotate % len(configs)
        configs = configs[shift:] + configs[:shift]  # build order differs per process
        loops = {c: make_loop(c, workdir) for c in configs}
        blocks = {c: [] for c in configs}
        orders = round_orders(configs, seed=args.rotate)
        for block in range(args.blocks + 1):
            spent = {c: loops[c].epoch(block, begin=True) for c in configs}
            for _ in range(args.steps):
                for config in next(orders):
                    spent[config] += loops[config].run_step()
            for config in configs:
                spent[config] += loops[config].epoch(block, begin=False)
                if block > 0:  # block 0 traces
                    blocks[config].append(spent[config])
            print(f"  {args.worker} block {block}: " + " ".join(
                f"{c}={spent[c] / args.steps * 1000:.2f}" for c in configs),
                file=sys.stderr, flush=True)
        for loop in loops.values():
            loop.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return blocks


def quiet_worker() -> None:
    """A worker process: no TensorFlow logging, no Python warnings on its stderr."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import warnings

    warnings.filterwarnings("ignore")


def worker(args) -> None:
    """Steps every configuration of one model in lockstep; emits block times (s)."""
    quiet_worker()
    x, y = _data(args.worker, args.steps * args.batch)
    jit = True if args.jit_compile else "auto"

    def make_loop(config, workdir):
        return _Loop(args.worker, config, x, y, args.batch, workdir, args.switch, jit)

    emit_result(lockstep_blocks(args, switched_configs(args.configs, args.switch), make_loop,
                                "tbs_overhead_steps_"))


def process_ratios(runs: list) -> dict:
    """Per configuration, each process's median block ratio to the baseline."""
    per_process = [paired_ratios(blocks) for blocks in runs]
    return {config: [ratios[config] for ratios in per_process] for config in runs[0]}


def summarize(model: str, runs: list, steps: int, goals: dict = GOALS) -> list[list[str]]:
    """Rows: config, median ms/step, median of the per-process median ratios, their range,
    and the verdict against ``goals``."""
    rows = []
    for config, per_process in process_ratios(runs).items():
        ratio = median(per_process)
        ms = median([median(blocks[config]) for blocks in runs]) / steps * 1000.0
        rows.append([model, config, fmt(ms, 3), fmt(ratio, 3),
                     f"{fmt(min(per_process), 3)}-{fmt(max(per_process), 3)}",
                     goal_verdict(config, ratio, goals)])
    return rows


def lockstep_parser(description: str, configs, extra_configs=()) -> argparse.ArgumentParser:
    """The flags every lockstep benchmark takes (this one's and `overhead_loop.py`'s).

    ``extra_configs`` may be asked for with ``--configs`` but are not run by default.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--configs", nargs="+", default=list(configs),
                        choices=list(configs) + list(extra_configs))
    parser.add_argument("--blocks", type=int, default=12,
                        help="measured blocks per process")
    parser.add_argument("--steps", type=int, default=100, help="steps per block")
    parser.add_argument("--processes", type=int, default=3,
                        help="fresh processes per model, each building in another order")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes for the smoke test (2 blocks of 3 steps)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--rotate", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def lockstep_args(parser: argparse.ArgumentParser, argv=None):
    """Parses ``argv``: ``--quick`` sizes, and the baseline always among the configs."""
    args = parser.parse_args(argv)
    if args.quick:
        args.blocks, args.steps, args.batch, args.processes = 2, 3, 8, 1
    if "baseline" not in args.configs:
        args.configs.insert(0, "baseline")
    return args


def lockstep_main(script: str, args, extra: list, goals: dict, peer: str,
                  peer_label: str) -> int:
    """Runs ``script``'s workers (``--processes`` per model), prints the table and the peers.

    Args:
      script: The benchmark script whose ``--worker`` mode steps one model's configs.
      args: Its parsed arguments (`lockstep_args`).
      extra: More worker arguments (``--switch``, ``--jit-compile``).
      goals: Configuration -> ratio goal, for the verdict column.
      peer: The configuration the goal configurations must beat.
      peer_label: How the peer line names it.
    """
    print(f"machine: {machine_description()}")
    print(f"sizes: blocks={args.blocks} (+1 excluded) steps/block={args.steps} "
          f"batch={args.batch} processes={args.processes}"
          f"{' jit_compile=True (XLA)' if args.jit_compile else ''}", flush=True)
    rows, ratios = [], {}
    for model in args.models:
        start = time.perf_counter()
        runs = [run_worker([os.path.abspath(script), "--worker", model,
                            "--blocks", str(args.blocks), "--steps", str(args.steps),
                            "--batch", str(args.batch), "--rotate", str(process),
                            *extra, "--configs", *args.configs])
                for process in range(args.processes)]
        print(f"  {model}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        rows += summarize(model, runs, args.steps, goals)
        ratios[model] = {c: median(r) for c, r in process_ratios(runs).items()}
    print(format_table(("model", "config", "median ms/step", "ratio", "per-process range",
                        "goal"), rows, markdown=args.markdown))
    for model, by_config in ratios.items():
        for line in peer_lines(model, by_config, (peer,), peer_label, goals):
            print(line)
    return 0


def parse_args(argv=None):
    parser = lockstep_parser(__doc__.splitlines()[0], CONFIGS)
    parser.add_argument("--jit-compile", action="store_true",
                        help="compile every model's step with XLA (Keras turns it on by "
                             "default where a GPU is present, not on a CPU)")
    parser.add_argument("--switch", metavar="MODULE.NAME=VALUE",
                        help="also run every stability configuration with this module "
                             "constant set while it traces")
    args = lockstep_args(parser, argv)
    if args.switch:
        try:
            parse_switch(args.switch)
        except ValueError as error:
            parser.error(str(error))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    extra = [*(["--switch", args.switch] if args.switch else []),
             *(["--jit-compile"] if args.jit_compile else [])]
    return lockstep_main(__file__, args, extra, GOALS, "tensorboard hist+batch",
                         "the TensorBoard callback")


if __name__ == "__main__":
    sys.exit(main())
