"""Per-logdir cache of what the plugin serves: the reader's runs and the report.

The plugin reads with exactly the same code as the CLI
(`tb_stability.reader.load_logdir` and `tb_stability.analysis.analyze_logdir`)
on the logdir TensorBoard was started with, so it behaves the same under
``--load_fast=false`` and under the Rust data server, and its findings equal
``tb-stability report LOGDIR --format json``.

A snapshot is recomputed only when the logdir's files change (their paths,
sizes and modification times); the reader itself re-reads only changed files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from typing import Any

_EVENT_MARKER = "tfevents"


@dataclasses.dataclass
class Snapshot:
    """What the plugin serves for one state of one logdir.

    Attributes:
      fingerprint: Hash of the logdir's file listing (paths, sizes, mtimes).
      runs: Run name -> `tb_stability.rundata.RunData`.
      report: ``analysis.report_to_json(analysis.analyze_logdir(logdir))``.
      warnings: The reader's logdir-level warnings.
    """

    fingerprint: str
    runs: dict[str, Any]
    report: dict[str, Any]
    warnings: list[str]

    def run_names(self) -> list[str]:
        """Every run the reader or the report knows, sorted."""
        names = set(self.runs)
        names.update(entry.get("run") for entry in self.report.get("runs", []))
        names.discard(None)
        return sorted(names)

    def report_entry(self, run: str) -> dict[str, Any] | None:
        """The report's ``{"run", "findings", "warnings"}`` entry of a run."""
        for entry in self.report.get("runs", []):
            if entry.get("run") == run:
                return entry
        return None


def fingerprint(logdir: str) -> str:
    """A hash of every file under ``logdir`` (relative path, size, mtime)."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(logdir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                stat = os.stat(path)
            except OSError:
                continue
            rel = os.path.relpath(path, logdir)
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def has_event_files(logdir: str) -> bool:
    """True as soon as one event file is found under ``logdir``."""
    if not logdir or not os.path.isdir(logdir):
        return False
    for _root, _dirs, files in os.walk(logdir):
        if any(_EVENT_MARKER in name for name in files):
            return True
    return False


class LogdirCache:
    """Thread-safe cache of the latest `Snapshot` of one logdir."""

    def __init__(self, logdir: str):
        """Creates the cache.

        Args:
          logdir: The logdir TensorBoard serves (``context.logdir``).
        """
        self._logdir = logdir or ""
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None

    @property
    def logdir(self) -> str:
        """The logdir this cache reads."""
        return self._logdir

    def snapshot(self) -> Snapshot:
        """The current snapshot, recomputed if the logdir changed since the last one."""
        with self._lock:
            current = fingerprint(self._logdir) if os.path.isdir(self._logdir) else ""
            if self._snapshot is None or self._snapshot.fingerprint != current:
                self._snapshot = self._load(current)
            return self._snapshot

    def _load(self, current: str) -> Snapshot:
        if not current and not os.path.isdir(self._logdir):
            return Snapshot(current, {}, {"version": 1, "runs": [], "warnings": []}, [])
        from tb_stability import analysis, reader  # pylint: disable=import-outside-toplevel

        try:
            logdir = reader.load_logdir(self._logdir)
            report = analysis.report_to_json(analysis.analyze_logdir(self._logdir))
        except reader.LogdirError as error:  # e.g. no event files yet
            return Snapshot(
                current, {}, {"version": 1, "runs": [], "warnings": [str(error)]}, [str(error)]
            )
        return Snapshot(
            fingerprint=current,
            runs=dict(logdir.runs),
            report=report,
            warnings=list(getattr(logdir, "warnings", []) or []),
        )
