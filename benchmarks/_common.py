"""Shared helpers of the benchmarks: interleaving, medians, subprocess workers, tables.

Every benchmark measures all its configurations side by side in one run:
repetition ``r`` runs every configuration once, in a fresh random order
(seeded), and results are reported as medians over repetitions. Random, not
rotated: a rotation keeps every configuration right after the same other one
(``c[i - 1]`` precedes ``c[i]`` in every round but one), and what a step
leaves behind (caches, thread pools, a background writer) then always lands on
the same neighbour. In `overhead_steps.py` that gave the A/A pair a steady
0.987 (three processes alike) against 1.003 with random orders. Peak memory is the
``ru_maxrss`` a fresh worker subprocess reports for itself.
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(REPO, ".venv", "bin")
RESULT_MARKER = "BENCH_RESULT "

T = TypeVar("T")


def median(values: Iterable[float]) -> float:
    """Median of ``values`` (NaN when empty)."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def round_orders(configs: Sequence[T], seed: int = 0) -> Iterator[list[T]]:
    """Endless rounds, each every configuration once in a random order (seeded).

    Every configuration is preceded by each other one equally often in
    expectation, so what a step leaves for the next one is shared out evenly.
    """
    rng = random.Random(seed)
    while True:
        order = list(configs)
        rng.shuffle(order)
        yield order


def interleaved(configs: Sequence[T], repetitions: int, seed: int = 0) -> list[tuple[int, T]]:
    """The run order: ``repetitions`` rounds, each every config once in a random order.

    Args:
      configs: The configurations to compare.
      repetitions: How many times each runs.
      seed: Seed of the orders (`round_orders`).

    Returns:
      ``(repetition, config)`` pairs.
    """
    rounds = round_orders(configs, seed)
    return [(rep, config) for rep in range(repetitions) for config in next(rounds)]


def run_interleaved(configs: Sequence[T], repetitions: int,
                    measure: Callable[[T], float]) -> dict[T, list[float]]:
    """Measures every config ``repetitions`` times, interleaved; returns config -> samples."""
    samples: dict[T, list[float]] = {c: [] for c in configs}
    for _rep, config in interleaved(configs, repetitions):
        samples[config].append(measure(config))
    return samples


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux: ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    """Current resident set size of this process in MiB (from /proc; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def emit_result(obj: Any) -> None:
    """Prints a worker's result on one marked stdout line (read by `run_worker`)."""
    sys.stdout.write(RESULT_MARKER + json.dumps(obj) + "\n")
    sys.stdout.flush()


def run_worker(args: Sequence[str], env: dict | None = None, timeout: float | None = None) -> Any:
    """Runs ``python ARGS`` in a fresh subprocess and returns its `emit_result` object.

    Raises:
      RuntimeError: If the worker fails or prints no result.
    """
    full_env = dict(os.environ)
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    raise RuntimeError(
        f"worker {' '.join(args)} failed (exit {proc.returncode}):\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Runs ``fn`` and returns (seconds, result)."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                 markdown: bool = False) -> str:
    """Formats rows as an aligned text table, or a markdown table."""
    cells = [[str(c) for c in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
              for i, h in enumerate(headers)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def machine_description() -> str:
    """One line: core count, CPU model, memory, load average, Python."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal"):
                    memory = f"{int(line.split()[1]) / 2**20:.1f} GiB RAM"
                    break
    except OSError:
        pass
    try:
        load = "load avg %.2f/%.2f/%.2f" % os.getloadavg()
    except OSError:
        load = ""
    return (f"{os.cpu_count()} cores, {model}, {memory}, {load}, "
            f"Python {platform.python_version()}")


def fmt(value: float, digits: int = 2) -> str:
    """Formats a float with ``digits`` decimals ('-' for NaN/None)."""
    if value is None or value != value:
        return "-"
    return f"{value:.{digits}f}"
