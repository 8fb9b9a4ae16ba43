"""Kernels' update ratios (|update| / |weight| per step), read once for every detector.

`updates` reports kernels whose ratio is too high or too low, and
`gradients.remedy_settings` takes the learning-rate cut of a run with ratios
too high from here, so that every remedy of one run lowers the rate by the
same factor (a GRU at SGD 30 was told ~100x by update_ratio_high and 10x by
divergence).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.rundata import RunData

HEALTHY = 1e-3
MAX_CUT = 100.0  # the most a remedy lowers a learning rate at once
HIGH = 1e-1
PEAK = 1.0


class KernelRatios(NamedTuple):
    """The update ratios of a run's kernel-like variables.

    Attributes:
      steps: ``[T]`` record steps.
      names: The kernels' variable names, in model order.
      values: ``[T, len(names)]`` ratios; under gradient accumulation, exact
        zeros (micro-steps without an update) are NaN.
    """

    steps: np.ndarray
    names: list
    values: np.ndarray


class HighRatios(NamedTuple):
    """Kernels whose update ratio is too high, and the learning-rate cut it measures.

    Attributes:
      columns: Indices into `KernelRatios.names` of the kernels flagged.
      worst: The flagged column with the largest single ratio.
      measured: Its median ratio where that is above ``HIGH``, else its largest.
      cut: ``measured / HEALTHY`` to one significant digit, at most ``MAX_CUT``.
      first_step: The first record where a flagged kernel is above ``HIGH``
        (the first record where none is).
      last_step: The last such record (the last record where none is).
    """

    columns: list
    worst: int
    measured: float
    cut: float
    first_step: int
    last_step: int


def kernel_ratios(run: RunData) -> KernelRatios | None:
    """The run's kernels' update ratios; None without a kernel-like variable's record."""
    m = run.variables.get("update_ratio")
    if m is None or not len(m):
        return None
    cols = [j for j in range(len(m.names)) if C.is_weight(m.names[j])]
    if not cols:
        return None
    values = np.asarray(m.values[:, cols], dtype=np.float64)
    if C.accumulation_steps(run) > 1:  # no update on this micro-step: not a measurement
        values = np.where(values == 0.0, np.nan, values)
    return KernelRatios(np.asarray(m.steps), [m.names[j] for j in cols], values)


def ratio_summary(values) -> tuple[np.ndarray, np.ndarray]:
    """Per-column median and max of finite values of a ``[T, N]`` array."""
    v = np.asarray(values, dtype=np.float64)
    v = np.where(np.isfinite(v), v, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(v, axis=0), np.nanmax(v, axis=0)


def high_columns(values, high: float = HIGH, peak: float = PEAK) -> list[int]:
    """Columns whose median > ``high`` or whose max > ``peak``."""
    med, mx = ratio_summary(values)
    return [j for j in range(med.size) if (med[j] > high) or (mx[j] > peak)]


def high_ratios(ratios: KernelRatios | None) -> HighRatios | None:
    """The kernels updated too much (median > ``HIGH`` or a record > ``PEAK``), or None."""
    if ratios is None:
        return None
    sub = ratios.values
    hi = high_columns(sub)
    if not hi:
        return None
    med, mx = ratio_summary(sub)
    rows = np.flatnonzero((np.where(np.isfinite(sub[:, hi]), sub[:, hi], 0) > HIGH).any(axis=1))
    first = int(ratios.steps[rows[0]]) if rows.size else int(ratios.steps[0])
    last = int(ratios.steps[rows[-1]]) if rows.size else int(ratios.steps[-1])
    worst = max(hi, key=lambda j: mx[j])
    measured = float(med[worst] if med[worst] > HIGH else mx[worst])
    cut = float(min(MAX_CUT, C.round_sig(measured / HEALTHY, 1)))
    return HighRatios(hi, worst, measured, cut, first, last)
