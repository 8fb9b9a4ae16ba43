"""Serving benchmark: the plugin's routes in a real TensorBoard, and the CLI end to end.

    python benchmarks/serving.py [--runs 20] [--steps 100000] [--variables 200]
                                 [--every 100] [--reps 10] [--cli-reps 3] [--quick]

Uses the synthetic logdir of ``benchmarks/reader.py`` (same flags, same cache).

* Starts ``tensorboard --logdir X --port FREE`` (the venv's ``tensorboard``;
  ``--load_fast`` is passed through, default TensorBoard's own) and times the
  routes of ``tb_stability/plugin/http_api.md``: ``/findings``, ``/runs``,
  ``/series?run=R&tag=loss`` and ``/matrix?run=R&quantity=grad_norm``. "cold"
  is the first request of each route; the very first request (``/findings``)
  pays for reading and analysing the whole logdir. "warm" is the median of
  ``--reps`` further requests, round-robin across routes.
* Times ``tb-stability --help`` (CLI start-up) and ``tb-stability report
  LOGDIR --format json`` end to end (median of ``--cli-reps``), and checks with
  ``python -X importtime`` whether either imported ``tensorflow``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import reader as reader_bench  # noqa: E402
from benchmarks._common import (  # noqa: E402
    REPO, VENV_BIN, fmt, format_table, machine_description, median,
)

PREFIX = "/data/plugin/stability"
WARM_GOAL_S = 1.0
CLI_START_GOAL_S = 1.0


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 600.0) -> tuple[float, int, bytes]:
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        body, status = error.read(), error.code
    return time.perf_counter() - start, status, body


def _executable(name: str) -> str:
    path = os.path.join(VENV_BIN, name)
    return path if os.path.exists(path) else name


def cli_command() -> tuple[list[str], str]:
    """The ``tb-stability`` console script, or ``python -m tb_stability.cli`` without it."""
    for directory in (VENV_BIN, os.path.dirname(sys.executable)):
        path = os.path.join(directory, "tb-stability")
        if os.path.exists(path):
            return [path], "console script"
    return [sys.executable, "-m", "tb_stability.cli"], "python -m tb_stability.cli (not installed)"


def start_tensorboard(logdir: str, load_fast: str | None, log_path: str):
    """Starts TensorBoard; returns (process, base URL, seconds until it answered)."""
    port = free_port()
    cmd = [_executable("tensorboard"), "--logdir", logdir, "--port", str(port),
           "--host", "127.0.0.1"]
    if load_fast:
        cmd += ["--load_fast", load_fast]
    log = open(log_path, "wb")
    start = time.perf_counter()
    # The repository on PYTHONPATH makes its egg-info (the plugin's entry point)
    # visible even when tb-stability is not pip-installed in the venv.
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = start + 120
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tensorboard exited with {proc.returncode}; see {log_path}")
        try:
            _get(base + "/data/plugins_listing", timeout=5)
            return proc, base, time.perf_counter() - start
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"tensorboard did not answer within 120 s; see {log_path}")


def peak_rss_of(pid: int) -> float:
    """VmHWM (peak RSS) of a live process in MiB, NaN when unavailable."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def bench_routes(base: str, run: str, reps: int,
                 timeout: float = 600.0) -> tuple[list[list[str]], dict]:
    """Cold and warm timings of the plugin's data routes."""
    quoted = urllib.parse.quote(run)
    routes = [
        ("/findings", f"{PREFIX}/findings"),
        ("/runs", f"{PREFIX}/runs"),
        ("/series", f"{PREFIX}/series?run={quoted}&tag=loss"),
        ("/matrix", f"{PREFIX}/matrix?run={quoted}&quantity=grad_norm"),
    ]
    cold, warm, sizes, statuses = {}, {n: [] for n, _ in routes}, {}, {}
    for name, path in routes:
        try:
            cold[name], statuses[name], body = _get(base + path, timeout)
        except TimeoutError:
            print(f"  {name}: no answer within {timeout:.0f} s", file=sys.stderr)
            rows = [[n, "TIMEOUT" if n == name else "-", f"> {timeout:.0f}" if n == name
                     else "-", "-", "-", "MISS"] for n, _ in routes]
            return rows, {"cold": cold, "warm": warm}
        sizes[name] = len(body)
        if statuses[name] != 200:
            print(f"  {name}: HTTP {statuses[name]}: {body[:300]!r}", file=sys.stderr)
    for _ in range(reps):
        for name, path in routes:
            seconds, status, _ = _get(base + path)
            warm[name].append(seconds)
    rows = []
    for name, _ in routes:
        w = median(warm[name])
        rows.append([name, statuses[name], fmt(cold[name], 3), fmt(w, 4),
                     f"{sizes[name] / 1024:.1f}", "ok" if w < WARM_GOAL_S else "MISS"])
    return rows, {"cold": cold, "warm": warm}


def _importtime_has_tensorflow(stderr: str) -> bool:
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            module = line.rsplit("|", 1)[1].strip()
            if module == "tensorflow" or module.startswith("tensorflow."):
                return True
    return False


def bench_cli(logdir: str, reps: int) -> list[list[str]]:
    """Times ``tb-stability --help`` and ``report --format json``; checks TF imports."""
    cli, how = cli_command()
    print(f"CLI: {how}", flush=True)
    rows = []
    env = dict(os.environ, PYTHONPATH=REPO)
    for label, args, goal in (("tb-stability --help", ["--help"], CLI_START_GOAL_S),
                              ("tb-stability report --format json",
                               ["report", logdir, "--format", "json"], None)):
        times, codes = [], set()
        for _ in range(reps):
            start = time.perf_counter()
            proc = subprocess.run([*cli, *args], capture_output=True, env=env, cwd=REPO)
            times.append(time.perf_counter() - start)
            codes.add(proc.returncode)
        valid = ""
        if "report" in args:
            try:
                report = json.loads(proc.stdout)
                valid = f"{len(report['runs'])} runs, " + \
                    f"{sum(len(r['findings']) for r in report['runs'])} findings"
            except (ValueError, KeyError):
                valid = "INVALID JSON"
        probe = subprocess.run(
            [sys.executable, "-X", "importtime", "-c",
             "import sys; from tb_stability.cli import main; main(sys.argv[1:])", *args],
            capture_output=True, text=True, env=env)
        imported_tf = _importtime_has_tensorflow(probe.stderr)
        t = median(times)
        verdict = "" if goal is None else ("ok" if t < goal else "MISS")
        rows.append([label, fmt(t, 3), ",".join(map(str, sorted(codes))),
                     "YES" if imported_tf else "no", valid, verdict])
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    reader_bench.add_logdir_args(parser)
    parser.add_argument("--reps", type=int, default=10, help="warm requests per route")
    parser.add_argument("--cli-reps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for one request")
    parser.add_argument("--load-fast", default=None, choices=("true", "false", "auto"),
                        help="TensorBoard's --load_fast (default: TensorBoard's default)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for the smoke test")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        reader_bench.use_quick_logdir(args)
        args.reps, args.cli_reps = 2, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"machine: {machine_description()}", flush=True)
    logdir, manifest = reader_bench.ensure_logdir(args.cache, args.runs, args.steps,
                                                  args.variables, args.every)
    print(f"logdir {logdir}: {args.runs} runs x {args.steps} steps x {args.variables} "
          f"variables, {manifest['events']:,} events, {manifest['bytes'] / 2**20:.1f} MiB",
          flush=True)
    log_path = os.path.join(args.cache, "tensorboard.log")
    proc, base, startup = start_tensorboard(logdir, args.load_fast, log_path)
    try:
        print(f"tensorboard answered after {startup:.1f} s (log: {log_path})", flush=True)
        rows, _ = bench_routes(base, "run_000", args.reps, args.timeout)
        tb_peak = peak_rss_of(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(format_table(("route", "status", "cold s", "warm median s", "KiB", "warm < 1 s"),
                       rows, markdown=args.markdown))
    print(f"tensorboard peak RSS: {fmt(tb_peak, 0)} MiB")
    cli_rows = bench_cli(logdir, args.cli_reps)
    print(format_table(("command", "median s", "exit", "imported tensorflow", "output",
                        "start < 1 s"), cli_rows, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
