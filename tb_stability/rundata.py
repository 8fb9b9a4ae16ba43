"""In-memory, full-resolution data of one run, as produced by the reader.

This is the interface between the reader (`tb_stability.reader`) and its
consumers (detectors via `tb_stability.analysis`, the CLI and the plugin).
All arrays are numpy arrays sorted by step with duplicate steps removed (the
last write of a step wins, as after a restart from a checkpoint).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class Series:
    """A scalar series: ``values[i]`` was logged at ``steps[i]``."""

    steps: np.ndarray  # int64 [T]
    values: np.ndarray  # float64 [T]

    def __len__(self) -> int:
        return int(self.steps.shape[0])


@dataclasses.dataclass
class Matrix:
    """A vector quantity over time: ``values[i, j]`` is ``names[j]`` at ``steps[i]``.

    ``missing`` marks entries no record held (NaN in ``values``): the names
    changed over the run, e.g. layers unfrozen for fine-tuning. None: every
    entry was recorded.
    """

    steps: np.ndarray  # int64 [T]
    names: tuple[str, ...]
    values: np.ndarray  # float64 [T, N]
    missing: np.ndarray | None = None  # bool [T, N]

    def __len__(self) -> int:
        return int(self.steps.shape[0])

    def nonfinite(self) -> np.ndarray:
        """``[T, N]`` True where a recorded value is NaN or infinite (not where it is missing)."""
        bad = ~np.isfinite(np.asarray(self.values, dtype=np.float64))
        return bad if self.missing is None else bad & ~self.missing

    def rows(self, keep) -> "Matrix":
        """The records selected by ``keep`` (a boolean mask or indices over steps)."""
        missing = None if self.missing is None else self.missing[keep]
        return Matrix(steps=self.steps[keep], names=self.names, values=self.values[keep],
                      missing=missing)


@dataclasses.dataclass
class RunData:
    """Everything the reader found for one run.

    Attributes:
      name: Run name, the run directory relative to the logdir (``"."`` for
        the logdir itself), with ``/`` separators.
      steps: Per-step columns from ``stability/steps`` (``"loss"``,
        ``"grad_norm"``, ``"nonfinite_grads"``, ``"learning_rate"``, ...), each
        a `Series` at full resolution.
      variables: Per-variable quantities (``"grad_norm"``, ``"weight_norm"``,
        ``"update_ratio"``) as `Matrix`.
      layers: Per-layer activation quantities as `Matrix`.
      inputs: Input statistics: ``{"mean"|"std"|"min"|"max": Matrix}`` over
        features.
      targets: The same statistics over a regression output's labels (names
        ``y[0]``, ...).
      labels: Class counts of labels as `Matrix` (names are class ids).
      predictions: Class counts of predictions as `Matrix`.
      scalars: Every ordinary scalar tag (``tf.summary.scalar``, Keras'
        TensorBoard callback: ``epoch_loss``, ``batch_loss``, ...) as `Series`.
      json: JSON records (``stability/run_info``, ``stability/nan_origin``):
        tag -> list of ``(step, dict)``.
      warnings: Human-readable problems met while reading this run (corrupt
        file, unknown metadata version, ...), each naming the file.
      held_out: The run holds a validation or test split's metrics, not
        training's (`mark_held_out`): its loss is not a training loss.
      hparams: The run's hyperparameters as the HParams dashboard records
        them (``hp.hparams({...})``): name -> number, string or bool.
      model_config: What Keras' TensorBoard callback recorded of the
        compiled model (`reader.keras_model`), in run_info's field names
        (``optimizer``, ``optimizer_config``, ``loss_name``, ``from_logits``,
        ``output_activation``, ``output_units``; per output under
        ``outputs`` for a model with several); ``{}`` where none.
    """

    name: str
    steps: dict[str, Series] = dataclasses.field(default_factory=dict)
    variables: dict[str, Matrix] = dataclasses.field(default_factory=dict)
    layers: dict[str, Matrix] = dataclasses.field(default_factory=dict)
    inputs: dict[str, Matrix] = dataclasses.field(default_factory=dict)
    targets: dict[str, Matrix] = dataclasses.field(default_factory=dict)
    labels: Matrix | None = None
    predictions: Matrix | None = None
    scalars: dict[str, Series] = dataclasses.field(default_factory=dict)
    json: dict[str, list[tuple[int, dict[str, Any]]]] = dataclasses.field(
        default_factory=dict
    )
    warnings: list[str] = dataclasses.field(default_factory=list)
    held_out: bool = False
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
    model_config: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def instrumented(self) -> bool:
        """True when the run holds tb-stability instrumentation data."""
        return bool(self.steps or self.variables or self.layers)

    @property
    def checkable(self) -> bool:
        """True when the run holds anything the detectors read (a scalar or stability data)."""
        return bool(self.instrumented or self.scalars or self.json)


# A run named so holds a held-out split's metrics: Keras' TensorBoard callback
# writes `X/train` and `X/validation`, an Estimator `eval`. The other names
# count only beside a training run, as a run of its own may be called "test".
HELD_OUT_RUNS = ("validation", "eval")
HELD_OUT_BESIDE_TRAIN = ("val", "valid", "test", "evaluation", "dev", "holdout")
TRAIN_RUNS = ("train", "training")


def held_out_names(names) -> dict[str, str]:
    """The held-out runs among ``names``, each with its training sibling ("" if none).

    ``X/validation`` and ``X/eval`` are held out on their own; ``X/val``,
    ``X/test``, ... (any case) only beside ``X/train`` or ``X/training``.
    """
    names = list(names)
    present = {n.lower(): n for n in names}
    out = {}
    for name in names:
        parent, _, last = name.rpartition("/")
        last = last.lower()
        if last not in HELD_OUT_RUNS and last not in HELD_OUT_BESIDE_TRAIN:
            continue
        prefix = parent + "/" if parent else ""
        sibling = next((present[(prefix + t).lower()] for t in TRAIN_RUNS
                        if (prefix + t).lower() in present), "")
        if last in HELD_OUT_RUNS or sibling:
            out[name] = sibling
    return out


def mark_held_out(runs: dict[str, RunData]) -> None:
    """Sets each run's ``held_out`` from the run names (`held_out_names`)."""
    held = held_out_names(runs)
    for name, run in runs.items():
        run.held_out = name in held
