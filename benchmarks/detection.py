"""Detection benchmark: runs the scenario matrix and prints a table per kind.

    python benchmarks/detection.py [--only NAME ...] [--markdown]

For each seed-article scenario it trains the broken program and its fixed
twin, analyses both with the same engine as the CLI and prints: whether the
expected kind was found (hit/miss), the kinds found, false alarms on the fixed
twin (critical findings, and findings of the expected kind), the first flagged
step and, where the onset is known by construction, the steps from onset to
first flag.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.scenarios.matrix import evaluate  # noqa: E402
from tests.scenarios.registry import SCENARIOS  # noqa: E402

HEADER = ("scenario", "expected kind", "result", "first flag", "delay", "kinds found",
          "fixed twin: critical / same kind", "train s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    rows = []
    hits = misses = false_alarms = 0
    with tempfile.TemporaryDirectory() as workdir:
        for scenario in SCENARIOS:
            if args.only and scenario.name not in args.only:
                continue
            outcome = evaluate(scenario, workdir)
            hit = outcome.hit
            hits += hit is not None
            misses += hit is None
            false_alarms += bool(outcome.fixed_critical)
            rows.append((
                scenario.name,
                "/".join(scenario.kinds),
                f"hit ({hit.kind})" if hit else "MISS",
                str(hit.first_step) if hit else "-",
                str(outcome.delay) if outcome.delay is not None else "n/a",
                ", ".join(sorted({f.kind for f in outcome.broken})) or "-",
                f"{len(outcome.fixed_critical)} / {len(outcome.fixed_same_kind)}"
                + (f" ({', '.join(sorted({f.severity for f in outcome.fixed_same_kind}))})"
                   if outcome.fixed_same_kind else ""),
                f"{outcome.train_seconds:.1f}",
            ))
            print(f"  ran {scenario.name}", file=sys.stderr, flush=True)
    if args.markdown:
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "---|" * len(HEADER))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]
        print("  ".join(h.ljust(w) for h, w in zip(HEADER, widths)))
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(f"\nhits {hits}, misses {misses}, fixed twins with a critical finding {false_alarms}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
