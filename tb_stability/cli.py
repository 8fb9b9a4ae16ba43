"""The ``tb-stability`` command line.

Usage::

    tb-stability report LOGDIR [--format text|json|markdown] [--run SUBSTR]

Exit status: 0 when no finding is critical, 1 when one is (usable as a CI
gate), 2 on usage or I/O errors. Heavy imports (numpy, protobuf) happen only
inside the command, so ``--help`` is instant; TensorFlow is never imported.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

EXIT_OK = 0
EXIT_CRITICAL = 1
EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="tb-stability",
        description="Training-stability doctor for TensorFlow/Keras TensorBoard logdirs.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="diagnose every run under a logdir",
        description="Diagnose every run under LOGDIR. Exit status: 0 when no finding is "
        "critical, 1 when one is, 2 on usage or I/O errors.",
    )
    report.add_argument("logdir", metavar="LOGDIR", help="TensorBoard log directory")
    report.add_argument("--format", choices=("text", "json", "markdown"), default="text",
                        help="output format (default: text)")
    report.add_argument("--run", metavar="SUBSTR", default=None,
                        help="only runs whose name contains SUBSTR")
    _add_replay_parser(commands)
    return parser


def _add_replay_parser(commands) -> None:
    """``replay RUN_DIR [--model FILE] [--loss LOSS]`` (needs TensorFlow; `instrumentation.replay`)."""
    replay = commands.add_parser(
        "replay",
        help="re-run the first non-finite step of a run and print where it started",
        description="Re-run the step saved in RUN_DIR/nan_origin/ on the saved model (or "
        "--model FILE: a .keras file or module.py:function) and print the NaN origin. "
        "Exit status: 0 same origin as recorded, 1 different, 2 errors. Needs TensorFlow.",
    )
    replay.add_argument("run_dir", metavar="RUN_DIR", help="run directory of the failed run")
    replay.add_argument("--model", metavar="FILE", default=None,
                        help="model to replay on (default: the saved model.keras)")
    replay.add_argument("--loss", metavar="LOSS", default=None,
                        help="the loss of a custom training loop (StabilityMonitor): a Keras "
                        "loss name or module.py:NAME (default: the recorded Keras name)")


def cmd_replay(args: argparse.Namespace) -> int:
    """Runs ``tb-stability replay`` (the training side, `instrumentation.replay`).

    The reader side never imports TensorFlow itself; replaying a Keras step needs
    the instrumentation package, which does.
    """
    import importlib.util

    try:
        if importlib.util.find_spec("tensorflow") is None:
            raise ImportError("No module named 'tensorflow'")
        from instrumentation import replay
    except (ImportError, ValueError) as error:
        return _error(f"replay needs TensorFlow and the instrumentation package ({error})")
    return replay.run(args.run_dir, args.model, args.loss)


def _error(message: str) -> int:
    sys.stderr.write(f"tb-stability: error: {message}\n")
    return EXIT_ERROR


def cmd_report(args: argparse.Namespace) -> int:
    """Runs ``tb-stability report``; returns the exit status."""
    import json

    from tb_stability import analysis, report_format
    from tb_stability.reader import LogdirError

    try:
        report = analysis.analyze_logdir(args.logdir, run_filter=args.run)
    except LogdirError as error:
        return _error(str(error))
    except OSError as error:
        return _error(f"cannot read {args.logdir!r}: {error}")
    if args.run is not None and not report.runs:
        return _error(f"no run name contains {args.run!r} under {args.logdir!r}")
    if args.format == "json":
        text = json.dumps(analysis.report_to_json(report), indent=2) + "\n"
    elif args.format == "markdown":
        text = report_format.render_markdown(report)
    else:
        sys.stderr.write(report_format.render_warnings_text(report))
        text = report_format.render_text(report)
    sys.stdout.write(text)
    sys.stdout.flush()
    return EXIT_CRITICAL if report.has_critical else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tb-stability`` console script.

    Args:
      argv: Arguments (defaults to ``sys.argv[1:]``).

    Returns:
      The exit status (also passed to `sys.exit` by the console script).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help exits 0, errors exit 2
        return int(exit_.code or 0)
    if args.version:
        from tb_stability import __version__

        sys.stdout.write(f"tb-stability {__version__}\n")
        return EXIT_OK
    if args.command == "replay":
        return cmd_replay(args)
    if args.command != "report":
        parser.print_usage(sys.stderr)
        return _error("a command is required (try: tb-stability report LOGDIR)")
    try:
        return cmd_report(args)
    except BrokenPipeError:  # e.g. piped into `head`
        # Python flushes stdout at exit; send it to devnull so that cannot raise.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
