"""Reader benchmark: full-resolution load of a big logdir, against TensorBoard's own reader.

    python benchmarks/reader.py [--runs 20] [--steps 100000] [--variables 200]
                                [--every 100] [--reps 3] [--quick] [--markdown]

A generator writes a synthetic logdir with `tb_stability.writer` (``runs`` run
directories; each has ``steps`` training steps as ``stability/steps`` blocks of
``every`` rows, the per-variable vectors ``grad_norm``, ``weight_norm`` and
``update_ratio`` over ``variables`` variables every ``every`` steps, an
``epoch_loss`` scalar every 1000 steps and a ``run_info`` record). It is
cached under ``--cache`` (default ``/tmp/tbs_bench_logdirs``) and reused.
A small case (2 runs x 2,000 steps x 20 variables) runs too unless ``--no-small``.

Each measurement runs in a fresh subprocess (clean peak memory) and reports
the load time and its own peak RSS (``ru_maxrss``), minus the RSS right before
the load (imports excluded). Loaders, interleaved across repetitions:

* ``tb_stability load_logdir``: `tb_stability.reader.load_logdir` (every
  record, CRC-checked, decoded into `RunData` arrays);
* ``EventAccumulator (TF)``: TensorBoard's
  ``event_accumulator.EventAccumulator(run_dir, size_guidance={TENSORS: 0,
  SCALARS: 0})`` + ``Reload()`` per run (keeps every event), with TensorFlow
  installed, as TensorBoard uses it (TF's C++ record reader; TF import time
  excluded from the load time but its memory is in the RSS baseline);
* ``EventAccumulator (no TF)``: the same with TensorBoard's TF stub (pure
  Python record reader), as in an environment without TensorFlow.

"data kept" is the size of the numpy arrays in the returned `RunData`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (  # noqa: E402
    current_rss_mb, emit_result, fmt, format_table, interleaved, machine_description, median,
    peak_rss_mb, run_worker,
)

LOADERS = ("tb_stability load_logdir", "EventAccumulator (TF)", "EventAccumulator (no TF)")
DEFAULT_CACHE = "/tmp/tbs_bench_logdirs"


# -------------------------------------------------------------- generator


def logdir_name(runs: int, steps: int, variables: int, every: int) -> str:
    """Cache directory name of one generated case."""
    return f"r{runs}_s{steps}_v{variables}_e{every}"


def generate(path: str, runs: int, steps: int, variables: int, every: int,
             seed: int = 0) -> dict:
    """Writes the synthetic logdir at ``path`` (reused when complete); returns its manifest.

    Returns:
      ``{"events", "bytes", "files", "seconds", ...}`` (``seconds``: generation time).
    """
    manifest_path = os.path.join(path, "MANIFEST.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as handle:
            return json.load(handle)
    import numpy as np

    from tb_stability import schema
    from tb_stability.writer import StabilityWriter

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    names = [f"block_{i // 2}/dense/{'kernel' if i % 2 == 0 else 'bias'}"
             for i in range(variables)]
    events = 0
    for r in range(runs):
        run_dir = os.path.join(path, f"run_{r:03d}")
        base_grad = rng.lognormal(-3, 1, size=variables).astype(np.float32)
        base_weight = rng.lognormal(0, 0.5, size=variables).astype(np.float32)
        with StabilityWriter(run_dir, wall_time=1.7e9) as writer:
            events += 1  # file_version
            writer.write_json(schema.TAG_RUN_INFO, 0, {"every": every, "names": names[:5]})
            events += 1
            for first in range(0, steps, every):
                count = min(every, steps - first)
                step_ids = np.arange(first, first + count, dtype=np.float64)
                block = np.empty((count, len(schema.STEP_COLUMNS)))
                block[:, 0] = step_ids
                block[:, 1] = 2.3 * np.exp(-step_ids / steps) + rng.normal(0, 0.02, count)
                block[:, 2] = 1.0 + rng.normal(0, 0.05, count)
                block[:, 3] = 0.0
                block[:, 4] = 1e-3
                writer.write_steps(block)
                noise = rng.lognormal(0, 0.1, size=(3, variables)).astype(np.float32)
                writer.write_variables(first, "grad_norm", names, base_grad * noise[0])
                writer.write_variables(first, "weight_norm", names, base_weight * noise[1])
                writer.write_variables(first, "update_ratio", names, 1e-3 * noise[2])
                events += 4
                if first % 1000 == 0:
                    writer.write_scalar("epoch_loss", first // 1000, float(block[0, 1]))
                    events += 1
    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if "tfevents" in f]
    manifest = {
        "runs": runs, "steps": steps, "variables": variables, "every": every,
        "events": events, "files": len(files),
        "bytes": sum(os.path.getsize(f) for f in files),
        "seconds": time.perf_counter() - start,
    }
    with open(manifest_path, "w") as handle:
        json.dump(manifest, handle)
    return manifest


def ensure_logdir(cache: str, runs: int, steps: int, variables: int, every: int) -> tuple[str, dict]:
    """The cached logdir of a case (generated when missing) and its manifest."""
    path = os.path.join(cache, logdir_name(runs, steps, variables, every))
    fresh = not os.path.exists(os.path.join(path, "MANIFEST.json"))
    if fresh and os.path.exists(path):
        import shutil

        shutil.rmtree(path)  # an interrupted generation
    manifest = generate(path, runs, steps, variables, every)
    manifest["cached"] = not fresh
    return path, manifest


# ----------------------------------------------------------------- worker


def _kept_bytes(logdir) -> int:
    import numpy as np

    total = 0

    def add(obj):
        nonlocal total
        for value in vars(obj).values():
            if isinstance(value, np.ndarray):
                total += value.nbytes

    for run in logdir.runs.values():
        for group in (run.steps, run.variables, run.layers, run.inputs, run.scalars):
            for item in group.values():
                add(item)
        for item in (run.labels, run.predictions):
            if item is not None:
                add(item)
    return total


def worker(loader: str, path: str) -> None:
    """Loads ``path`` once with ``loader`` in this fresh process; emits time and memory."""
    result = {}
    if loader == "tb_stability load_logdir":
        from tb_stability.reader import load_logdir

        before = current_rss_mb()
        start = time.perf_counter()
        logdir = load_logdir(path)
        result["seconds"] = time.perf_counter() - start
        result["peak_rss_mb"] = peak_rss_mb()
        result["kept_mb"] = _kept_bytes(logdir) / 2**20
        result["runs"] = len(logdir.runs)
        result["tf_imported"] = "tensorflow" in sys.modules
    else:
        if loader == "EventAccumulator (no TF)":
            import types

            sys.modules["tensorboard.compat.notf"] = types.ModuleType("tensorboard.compat.notf")
        from tensorboard.backend.event_processing import event_accumulator as ea
        from tensorboard.compat import tf as tf_compat

        tf_compat.__version__  # resolve the lazy import (TF or the stub) before timing
        from tensorboard.backend.event_processing import event_file_loader  # noqa: F401

        before = current_rss_mb()
        guidance = {ea.TENSORS: 0, ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.IMAGES: 0,
                    ea.AUDIO: 0, ea.COMPRESSED_HISTOGRAMS: 0}
        start = time.perf_counter()
        accumulators = []
        for directory, _, files in sorted(os.walk(path)):
            if any("tfevents" in f for f in files):
                acc = ea.EventAccumulator(directory, size_guidance=guidance)
                acc.Reload()
                accumulators.append(acc)
        result["seconds"] = time.perf_counter() - start
        result["peak_rss_mb"] = peak_rss_mb()
        result["runs"] = len(accumulators)
        result["tensors"] = sum(len(a.Tensors(t)) for a in accumulators
                                for t in a.Tags()["tensors"])
        result["tf_imported"] = "tensorflow" in sys.modules
    result["rss_before_mb"] = before
    emit_result(result)


# ------------------------------------------------------------------- main


def measure_case(label: str, path: str, manifest: dict, loaders, reps: int) -> list[list[str]]:
    """Interleaved, fresh-process measurements of every loader on one logdir."""
    for directory, _, files in os.walk(path):  # warm the page cache for everyone
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                while handle.read(1 << 24):
                    pass
    samples = {loader: [] for loader in loaders}
    for _rep, loader in interleaved(list(loaders), reps):
        result = run_worker([os.path.abspath(__file__), "--worker", loader, path])
        samples[loader].append(result)
        print(f"  {label} {loader}: {result['seconds']:.2f} s, "
              f"peak {result['peak_rss_mb']:.0f} MiB", file=sys.stderr, flush=True)
    rows = []
    base = median(r["seconds"] for r in samples[loaders[0]])
    mb = manifest["bytes"] / 2**20
    for loader in loaders:
        results = samples[loader]
        seconds = median(r["seconds"] for r in results)
        peak = median(r["peak_rss_mb"] for r in results)
        grown = median(r["peak_rss_mb"] - r["rss_before_mb"] for r in results)
        kept = median(r.get("kept_mb") for r in results)
        rows.append([label, loader, fmt(seconds, 2), f"{manifest['events'] / seconds:,.0f}",
                     fmt(mb / seconds, 1), fmt(peak, 0), fmt(grown, 0),
                     fmt(kept, 1), fmt(seconds / base, 2)])
    return rows


def add_logdir_args(parser: argparse.ArgumentParser) -> None:
    """The synthetic logdir's size options (shared with ``serving.py``, which reuses it)."""
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--variables", type=int, default=200)
    parser.add_argument("--every", type=int, default=100,
                        help="per-variable vectors every N steps; steps blocks of N rows")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help="where generated logdirs live")


def use_quick_logdir(args: argparse.Namespace) -> None:
    """The smoke tests' tiny logdir: 2 runs x 500 steps x 10 variables."""
    args.runs, args.steps, args.variables, args.every = 2, 500, 10, 50


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_logdir_args(parser)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=LOADERS)
    parser.add_argument("--no-small", action="store_true", help="skip the small case")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for the smoke test")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("LOADER", "LOGDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        use_quick_logdir(args)
        args.reps, args.no_small = 1, True
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    print(f"machine: {machine_description()}", flush=True)
    cases = []
    if not args.no_small:
        cases.append(("small", 2, 2000, 20, args.every))
    cases.append(("big" if not args.quick else "quick", args.runs, args.steps, args.variables,
                  args.every))
    rows = []
    for label, runs, steps, variables, every in cases:
        path, manifest = ensure_logdir(args.cache, runs, steps, variables, every)
        label = f"{label} {runs}x{steps}x{variables}"
        print(f"{label}: {path}: {manifest['events']:,} events, {manifest['files']} files, "
              f"{manifest['bytes'] / 2**20:.1f} MiB; "
              + ("cached" if manifest["cached"] else
                 f"generated in {manifest['seconds']:.1f} s"), flush=True)
        rows += measure_case(label, path, manifest, args.loaders, args.reps)
    headers = ("case", "loader", "median load s", "events/s", "MB/s", "peak RSS MiB",
               "RSS growth MiB", "data kept MiB", "time vs tb_stability")
    print(format_table(headers, rows, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
