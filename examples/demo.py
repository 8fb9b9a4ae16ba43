"""The main job: train the seed-article scenarios, report on them, serve TensorBoard.

Usage (from the repository root, inside the project's venv; `make demo` does it):

    python examples/demo.py --logdir runs/demo            # train, report, serve
    python examples/demo.py --logdir runs/demo --no-serve # train and report only

Each scenario of `tests/scenarios` becomes one run (``<name>``) and its fixed
twin another (``<name>_fixed``), plus a healthy baseline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _train_all(logdir: str, only: list[str] | None, with_fixed: bool) -> None:
    from tests.scenarios.registry import HEALTHY, SCENARIOS, run_scenario

    plan = [(HEALTHY, False)]
    for scenario in SCENARIOS:
        if only and scenario.name not in only:
            continue
        plan.append((scenario, False))
        if with_fixed:
            plan.append((scenario, True))
    started = time.monotonic()
    for scenario, fixed in plan:
        name = scenario.name + ("_fixed" if fixed else "")
        t0 = time.monotonic()
        run_scenario(scenario, os.path.join(logdir, name), fixed)
        print(f"  trained {name:<28} {time.monotonic() - t0:5.1f} s", flush=True)
    print(f"trained {len(plan)} runs in {time.monotonic() - started:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/demo")
    parser.add_argument("--no-serve", action="store_true", help="stop after the report")
    parser.add_argument("--no-fixed", action="store_true", help="skip the fixed twins")
    parser.add_argument("--only", nargs="*", help="scenario names to train")
    parser.add_argument("--port", type=int, default=6006)
    args = parser.parse_args(argv)

    if os.path.isdir(args.logdir):
        shutil.rmtree(args.logdir)
    os.makedirs(args.logdir)
    print(f"training scenarios into {args.logdir}", flush=True)
    _train_all(args.logdir, args.only, not args.no_fixed)

    from tb_stability import cli

    print("\n$ tb-stability report", args.logdir, flush=True)
    code = cli.main(["report", args.logdir])
    print(f"(report exit code {code}: 1 means a critical finding exists)", flush=True)
    if args.no_serve:
        return 0
    port = args.port
    tensorboard = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    print(f"\nserving TensorBoard on http://localhost:{port}/#stability (Ctrl-C to stop)", flush=True)
    try:
        return subprocess.call(
            [tensorboard, "--logdir", args.logdir, "--port", str(port), "--host", "localhost"]
        )
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
