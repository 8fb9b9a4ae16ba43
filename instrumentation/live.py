"""Live warnings: the report's own detectors, run on what training has logged so far.

One engine, three faces: the CLI, the plugin and these live warnings all use
`tb_stability.detectors`. The callback feeds every block of per-step rows and
every per-variable record it writes; `LiveDiagnosis.check` runs the detectors
that can raise a *critical* finding on a bounded window of that data and
returns the critical findings not announced before (one line each).
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable, Optional, Sequence

import numpy as np

from tb_stability import schema
from tb_stability.findings import Finding
from tb_stability.rundata import Matrix, RunData, Series

logger = logging.getLogger("tb_stability")

WINDOW_STEPS = 4096
WINDOW_RECORDS = 256
MIN_SECONDS_BETWEEN_CHECKS = 1.0
VARIABLE_ROWS = ("grad_norm", "weight_norm", "update_ratio")


def _critical_detectors() -> list[Callable[[RunData], list]]:
    from tb_stability.detectors import gradients, nonfinite, trends

    return [nonfinite.detect, gradients.detect_exploding, trends.detect_divergence]


class LiveDiagnosis:
    """Bounded in-memory copy of a run's recent data, checked by the detectors.

    Args:
      run_name: Name used in findings (the log directory).
      window_steps: How many recent per-step rows are kept.
      window_records: How many recent per-variable records are kept.
      min_interval: Minimum seconds between two detector passes (the last
        pass at the end of training is never skipped).
      detectors: Detectors to run (default: nan_inf, exploding_gradients,
        divergence: the kinds that can be critical during training).
    """

    def __init__(self, run_name: str, window_steps: int = WINDOW_STEPS,
                 window_records: int = WINDOW_RECORDS,
                 min_interval: float = MIN_SECONDS_BETWEEN_CHECKS,
                 detectors: Optional[Sequence[Callable[[RunData], list]]] = None):
        self.run_name = run_name
        self._rows: collections.deque = collections.deque()
        self._row_count = 0
        self._window_steps = int(window_steps)
        self._records: collections.deque = collections.deque(maxlen=int(window_records))
        self._columns: tuple[str, ...] = schema.STEP_COLUMNS
        self._names: tuple[str, ...] = ()
        self._min_interval = float(min_interval)
        self._last_check = -float("inf")
        self._detectors = list(detectors) if detectors is not None else None
        self._origin: Optional[tuple[int, dict]] = None
        self._holds_start = True  # the window still begins at the fit's first step
        self.announced: set[str] = set()

    def feed_steps(self, rows: np.ndarray, columns: Sequence[str] = schema.STEP_COLUMNS) -> None:
        """Adds a block of per-step rows ``[k, len(columns)]`` (keeps the newest)."""
        rows = np.array(rows, dtype=np.float64, copy=True)
        if rows.ndim != 2 or rows.shape[0] == 0:
            return
        if self._rows and (tuple(columns) != self._columns or rows[0, 0] <= self._rows[-1][-1, 0]):
            self._rows.clear()  # a new fit (steps restart, other columns): a new window
            self._row_count = 0
            self._origin = None
            self._holds_start = True
        self._columns = tuple(columns)
        self._rows.append(rows)
        self._row_count += rows.shape[0]
        while self._rows and self._row_count - self._rows[0].shape[0] >= self._window_steps:
            self._row_count -= self._rows.popleft().shape[0]
            self._holds_start = False

    def feed_variables(self, step: int, stats: np.ndarray, names: Sequence[str]) -> None:
        """Adds one per-variable record ``[rows, num_variables]`` (rows as `VARIABLE_ROWS`)."""
        if tuple(names) != self._names or (self._records and step <= self._records[-1][0]):
            self._records.clear()  # other variables (layers unfrozen) or a new fit
        self._names = tuple(names)
        self._records.append((int(step), np.array(stats, dtype=np.float64, copy=True)))

    def feed_origin(self, step: int, record: dict) -> None:
        """Adds the NaN forensics' record (``stability/nan_origin``) of ``step``."""
        self._origin = (int(step), record)

    def run_data(self) -> RunData:
        """The window as `RunData`, as the reader would build it."""
        run = RunData(name=self.run_name)
        if self._rows:
            block = np.concatenate(list(self._rows))
            steps = block[:, 0].astype(np.int64)
            for index, column in enumerate(self._columns):
                if column != "step":
                    run.steps[column] = Series(steps, block[:, index])
        if self._records:
            steps = np.array([step for step, _ in self._records], np.int64)
            rows = min(stats.shape[0] for _, stats in self._records)
            stacked = np.stack([stats[:rows] for _, stats in self._records])  # [T, rows, V]
            for index, quantity in enumerate(VARIABLE_ROWS[:rows]):
                run.variables[quantity] = Matrix(steps, self._names, stacked[:, index, :])
        if self._origin is not None:
            run.json[schema.TAG_NAN_ORIGIN] = [self._origin]
        return run

    def check(self, force: bool = False) -> list[Finding]:
        """Runs the detectors; returns critical findings of kinds not announced yet."""
        now = time.monotonic()
        if not force and now - self._last_check < self._min_interval:
            return []
        self._last_check = now
        if not self._rows:
            return []
        if self._detectors is None:
            self._detectors = _critical_detectors()
        run = self.run_data()
        fresh = []
        for detector in self._detectors:
            for finding in detector(run) or []:
                if finding.evidence.get("early_blowup") and not self._holds_start:
                    continue  # the window's first point is not the fit's: no "early" to speak of
                if finding.severity == "critical" and finding.kind not in self.announced:
                    self.announced.add(finding.kind)
                    finding.run = self.run_name
                    fresh.append(finding)
        return fresh


def warning_line(finding: Finding, log_dir: str) -> str:
    """One concise line for a live critical finding."""
    explanation = finding.explanation.split(". ")[0].rstrip(".")
    remedy = next((line.strip() for line in finding.remedy.splitlines() if line.strip()), "")
    where = f"step {finding.first_step}" if finding.first_step is not None else "this run"
    return (f"tb-stability: CRITICAL {finding.kind} at {where}: {explanation}. "
            f"Fix: {remedy} (details: tb-stability report {log_dir})")
