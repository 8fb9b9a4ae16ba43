"""Helpers shared by the detector adapters: picking series out of `RunData`,
classifying variable paths, reading run_info, and formatting numbers for
evidence and remedies (the remedies' optimizer calls: `_remedies`)."""

from __future__ import annotations

import math
import re

import numpy as np

from tb_stability import running_mean, schema
from tb_stability.detectors import _loss_tags
from tb_stability.rundata import HELD_OUT_RUNS, Matrix, RunData, Series

# Ordinary-log loss tags, best first. Keras' `batch_loss` is a running epoch
# mean (it hides spikes and resets every epoch): its per-batch values, when
# `running_mean.per_batch` can recover them, come before `epoch_loss`, the raw
# running mean after it.
LOSS_TAGS = ("loss", "train_loss", "training_loss", "train/loss", "epoch_loss", "batch_loss")
PER_BATCH_BEFORE = "epoch_loss"
PER_BATCH_SOURCE = "scalar:batch_loss (per batch)"
VAL_LOSS_TAGS = ("val_loss", "epoch_val_loss", "validation_loss", "val/loss", "valid_loss")
_NOT_WEIGHT = re.compile(
    r"(^|[/_])(bias|beta|gamma|moving_mean|moving_variance|mean|variance|count|seed|iterations)(:\d+)?$"
)


def _loss_candidates(run: RunData):
    """``(kind, tag)`` of each training loss the run may have, best first.

    A ``"per_batch"`` candidate still needs its epochs placed
    (`running_mean`); the first of the others is always there.
    """
    s = run.steps.get("loss")
    if s is not None and len(s):
        yield "steps", "loss"
        return
    if _held_out(run):
        return
    for tag in LOSS_TAGS:
        if tag == PER_BATCH_BEFORE and "batch_loss" in run.scalars:
            yield "per_batch", "batch_loss"
        s = run.scalars.get(tag)
        if s is not None and len(s):
            yield "scalars", tag
    if _loss_tags.adversarial_losses(run):
        return  # a GAN's two losses: neither should fall (`analysis._no_loss` says so)
    others = _loss_tags.training_loss_tags(run)
    if others:
        yield "scalars", others[0]


def loss_choice(run: RunData) -> tuple[str, str] | None:
    """Which series `loss_series` reads: ``(kind, tag)`` without building it.

    ``kind`` is ``"steps"`` (the instrumentation's raw per-step loss),
    ``"per_batch"`` (Keras' running-mean ``batch_loss``, recovered by
    `running_mean.per_batch`) or ``"scalars"`` (an ordinary scalar tag). None
    when the run has no training loss: none is logged, or the run is a
    held-out split (Keras' ``X/validation``, or ``X/val``, ``X/test`` beside
    ``X/train``; see `rundata.mark_held_out`), whose loss the overfitting
    detector reads.
    """
    for kind, tag in _loss_candidates(run):
        if kind != "per_batch" or running_mean.recoverable(run, tag):
            return kind, tag
    return None


def loss_series(run: RunData) -> tuple[Series | None, str]:
    """The run's training loss series and where it came from (`loss_choice`'s).

    Prefers the instrumentation's raw per-step loss (``steps["loss"]``), else
    an ordinary scalar tag in `LOSS_TAGS` order, with the per-batch losses
    recovered from Keras' running-mean ``batch_loss`` (`running_mean`) before
    ``epoch_loss``, else the best of the run's other training loss tags
    (`_loss_tags.training_loss_tags`: ``Loss/train``, ``train_loss_step``,
    ``Loss/total_loss``, ...).

    Returns:
      ``(series, source)`` where source is e.g. ``"stability/steps:loss"``,
      ``"scalar:epoch_loss"`` or `PER_BATCH_SOURCE`; ``(None, "")`` when
      the run has none.
    """
    for kind, tag in _loss_candidates(run):
        if kind == "steps":
            return run.steps[tag], "stability/steps:loss"
        if kind == "scalars":
            return run.scalars[tag], f"scalar:{tag}"
        s = running_mean.per_batch(run, tag)
        if s is not None:
            return s, PER_BATCH_SOURCE
    return None, ""


def epoch_loss_series(run: RunData) -> tuple[Series, str] | None:
    """The run's training loss logged once per epoch, and its source; None when it has none.

    Keras' ``epoch_loss`` (its TensorBoard callback, the StabilityCallback's
    epoch scalars), else the whole-loss training tag with the word ``epoch``
    (``train_loss_epoch``). Held-out runs have none (`loss_series`).
    """
    if _held_out(run):
        return None
    s = run.scalars.get("epoch_loss")
    if s is not None and len(s):
        return s, "scalar:epoch_loss"
    for tag in _loss_tags.training_loss_tags(run):
        if "epoch" in _loss_tags.words(tag) and not _loss_tags.is_part(tag):
            return run.scalars[tag], f"scalar:{tag}"
    return None


def _held_out(run: RunData) -> bool:
    """Whether the run holds a held-out split's metrics, so no training loss."""
    return run.held_out or is_validation_run(run.name)


def is_validation_run(name: str) -> bool:
    """True for the run Keras' TensorBoard callback writes validation metrics to.

    By its name alone (`rundata.HELD_OUT_RUNS`), for a run read on its own;
    `load_logdir` also marks ``X/val``, ``X/test``, ... beside ``X/train``
    (`RunData.held_out`).
    """
    return name.rsplit("/", 1)[-1] in HELD_OUT_RUNS


def is_validation_tag(tag: str) -> bool:
    """True for tags that hold validation/test metrics (`_loss_tags.is_held_out`)."""
    return _loss_tags.is_held_out(tag)


def val_loss_series(run: RunData, twin_of: str | None = None) -> tuple[Series | None, str]:
    """The run's validation loss scalar if it logs one, e.g. ``epoch_val_loss``.

    Keras' names (`VAL_LOSS_TAGS`) first, else the best held-out loss tag
    (`_loss_tags.validation_loss_tags`), the twin of the training tag
    ``twin_of`` first (``Loss/test`` for ``Loss/train``).
    """
    for tag in VAL_LOSS_TAGS:
        s = run.scalars.get(tag)
        if s is not None and len(s):
            return s, tag
    others = _loss_tags.validation_loss_tags(run, twin_of)
    return (run.scalars[others[0]], others[0]) if others else (None, "")


def is_weight(name: str) -> bool:
    """True for kernel-like variables (not biases, norm offsets/scales or stats)."""
    return not _NOT_WEIGHT.search(name.lower())


def weight_columns(matrix: Matrix) -> list[int]:
    """Column indices of kernel-like variables in model order (all if none match)."""
    cols = [i for i, n in enumerate(matrix.names) if is_weight(n)]
    return cols or list(range(len(matrix.names)))


def finite_weight_norms(run: RunData):
    """``(kernel, its finite recorded weight norms)`` for each kernel-like variable, in model order."""
    m = run.variables.get("weight_norm")
    if m is None or not len(m):
        return
    for j in weight_columns(m):
        column = m.values[:, j]
        yield m.names[j], column[np.isfinite(column)]


def names_layer(path: str, layer: str) -> bool:
    """Whether a component of a variable or layer path names ``layer`` (a probe's name or path).

    ``sequential/gru/gru_cell/kernel`` lies in the probe ``gru``; a path-like
    ``layer`` is matched by its last component.
    """
    return layer.rstrip("/").rsplit("/", 1)[-1] in path.split("/")


def global_grad_norm_with_source(run: RunData) -> tuple[Series | None, str | None]:
    """`global_grad_norm` and where it came from, as evidence names it."""
    s = run.steps.get("grad_norm")
    if s is not None and len(s):
        return s, "stability/steps:grad_norm"
    m = run.variables.get("grad_norm")
    if m is not None and len(m):
        with np.errstate(over="ignore", invalid="ignore"):
            g = np.sqrt(np.sum(np.square(m.values), axis=1))
        return Series(steps=m.steps, values=g), "variables:grad_norm (global)"
    tag = _loss_tags.gradient_norm_tag(run)
    return (run.scalars[tag], f"scalar:{tag}") if tag is not None else (None, None)


def global_grad_norm(run: RunData) -> Series | None:
    """Per-step global gradient norm, or one rebuilt from per-variable norms.

    In an ordinary log, a scalar that holds the global gradient norm
    (`_loss_tags.gradient_norm_tag`: ``grad_norm``, ``train/grad_norm``, ...).
    """
    return global_grad_norm_with_source(run)[0]


def no_gradient_variables(run: RunData) -> set[str]:
    """Variables whose recorded gradient is exactly 0 in every finite record.

    Such a variable is not connected to the loss (a layer built but never
    called, an output branch no loss uses, a path through an integer cast,
    ``argmax`` or ``tf.stop_gradient``) or sits behind units that are all dead:
    no learning rate moves it, and it says nothing about how gradients flow
    through depth. Without per-variable gradient norms, a weight update of
    exactly 0 in every record after the first (not under gradient
    accumulation, where most steps do not update) stands for it.
    """
    m = run.variables.get("grad_norm")
    if m is None or not len(m):
        m = run.variables.get("update_ratio")
        if m is None or len(m) < 3 or accumulation_steps(run) > 1:
            return set()
        m = m.rows(slice(1, None))
    v = np.asarray(m.values, dtype=np.float64)
    finite = np.isfinite(v)
    out = set()
    for j, name in enumerate(m.names):
        col = v[finite[:, j], j]
        if col.size >= 2 and np.all(col == 0.0):
            out.add(name)
    return out


def value_at(series: Series | None, step: int) -> float | None:
    """Value of ``series`` at ``step`` (exact match) or None."""
    if series is None or not len(series):
        return None
    idx = np.searchsorted(series.steps, step)
    if idx < len(series) and int(series.steps[idx]) == step:
        return float(series.values[idx])
    return None


def lr_series(run: RunData) -> Series | None:
    """The logged learning rate: the instrumentation's per-step one, else an ordinary
    scalar tag that holds it (`_loss_tags.learning_rate_tag`); None where none is."""
    s = run.steps.get("learning_rate")
    if s is None:
        tag = _loss_tags.learning_rate_tag(run)
        s = run.scalars[tag] if tag else None
    return s if s is not None and len(s) else None


def lr_at(run: RunData, step: int | None) -> float | None:
    """Learning rate at or just before ``step`` when logged; else the one the run's
    hyperparameters name (`RunData.hparams`: constant over the run)."""
    s = lr_series(run)
    if s is None:
        return _compiled_learning_rate(run) or _loss_tags.learning_rate_hparam(run)
    if step is None:
        step = int(s.steps[-1])
    idx = int(np.searchsorted(s.steps, step, side="right")) - 1
    idx = min(max(idx, 0), len(s) - 1)
    v = float(s.values[idx])
    return v if math.isfinite(v) else None


def _compiled_learning_rate(run: RunData) -> float | None:
    """The constant learning rate the recorded compiled model's optimizer was given, if one."""
    config = run.model_config.get("optimizer_config")
    value = config.get("learning_rate") if isinstance(config, dict) else None
    # None where none was recorded, or a schedule (a dict)
    return float(value) if _loss_tags.is_positive_number(value) else None


def fmt(x) -> str:
    """Compact human formatting of a number (3 significant digits)."""
    if x is None:
        return "n/a"
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e4:
        return f"{x:.3g}"
    return f"{x:.2e}"


def round_sig(x: float, digits: int = 2) -> float:
    """``x`` rounded to ``digits`` significant digits."""
    if not x or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")


def num(x):
    """A plain float for evidence (None stays None)."""
    return None if x is None else float(x)


def latest_run_info(run: RunData, key: str | None = None) -> dict:
    """The newest ``stability/run_info`` record of ``run`` (holding ``key``, if given); {} if none."""
    for _, info in reversed(run.json.get("stability/run_info") or []):
        if isinstance(info, dict) and (key is None or key in info):
            return info
    return {}


def epoch_positions(run: RunData, source: str, steps) -> tuple[np.ndarray, np.ndarray] | None:
    """Where each of ``steps`` sits in its epoch: ``(position, epoch_length)`` in batches.

    ``position`` counts from 0, so ``position == epoch_length - 1`` is an
    epoch's last batch. Known exactly for the per-batch losses recovered from
    Keras' ``batch_loss`` (`PER_BATCH_SOURCE`: `running_mean.epoch_positions`),
    and for an instrumented run whose ``run_info`` records
    ``steps_per_epoch`` S: each fit's record sits at its first step s0, and its
    epochs are the S steps from s0 + kS. None where unknown.
    """
    steps = np.asarray(steps, dtype=np.int64)
    if source == PER_BATCH_SOURCE:
        return running_mean.epoch_positions(run, steps, "batch_loss")
    records = sorted((int(step), info.get("steps_per_epoch")) for step, info in
                     run.json.get("stability/run_info") or [] if isinstance(info, dict))
    if not records or not all(isinstance(spe, int) and spe > 0 for _, spe in records):
        return None
    position = np.full(steps.size, -1, dtype=np.int64)
    length = np.zeros(steps.size, dtype=np.int64)
    for i, (start, spe) in enumerate(records):
        stop = records[i + 1][0] if i + 1 < len(records) else np.iinfo(np.int64).max
        inside = (steps >= start) & (steps < stop)
        position[inside] = (steps[inside] - start) % spe
        length[inside] = spe
    return position, length


def single_loss_name(info: dict) -> str:
    """The canonical name of a run's one loss (lower case), or "" where it has several or none.

    ``loss_name`` (what the instrumentation recorded) first; else ``loss`` when
    it is one name or one serialised Loss (``{"class_name", "config"}``). A list
    or a per-output dict of losses has no single name: pairing one output's
    loss with another output's activation is how false findings are made.
    """
    if isinstance(info.get("outputs"), list) and len(info["outputs"]) > 1:
        return ""
    name = info.get("loss_name")
    if isinstance(name, str) and name:
        return name.lower()
    loss = info.get("loss")
    if isinstance(loss, str):
        return loss.lower()
    if isinstance(loss, dict) and isinstance(loss.get("class_name"), str):
        return schema.snake_case(loss["class_name"])
    return ""


def optimizer_of(info: dict) -> tuple[object, dict]:
    """``(class name, config)`` of one run_info record's optimizer: the inner one of a
    LossScaleOptimizer (which carries the clipping and the learning rate)."""
    name = info.get("optimizer")
    config = info.get("optimizer_config")
    config = config if isinstance(config, dict) else {}
    inner = config.get("inner_optimizer")
    if isinstance(inner, dict):
        name = inner.get("class_name", name)
        config = inner.get("config", inner)
    return name, config if isinstance(config, dict) else {}


def multilabel(run: RunData) -> bool:
    """Whether the run's (first) output is multi-label (`schema.is_multilabel`): its recorded
    class counts, if an older writer took them, are arg-maxes of multi-hot rows, not classes."""
    info = first_run_info(run)
    if not isinstance(info, dict):
        return False
    entry = info["outputs"][0] if isinstance(info.get("outputs"), list) and info["outputs"] \
        and isinstance(info["outputs"][0], dict) else info
    return schema.is_multilabel(entry.get("loss_name") or entry.get("loss"),
                                entry.get("output_activation"), entry.get("output_units"))


def label_entropy(run: RunData) -> float | None:
    """Entropy (nats) of the recorded class shares of a cross-entropy run: the loss of always
    predicting those shares. None without a single cross-entropy loss or class counts, for a
    multi-label output, or with fewer than two classes present."""
    lab = run.labels
    if lab is None or not len(lab) or lab.values.shape[1] < 2 or multilabel(run):
        return None
    if "crossentropy" not in single_loss_name(latest_run_info(run)):
        return None
    counts = np.nansum(np.asarray(lab.values, dtype=np.float64), axis=0)
    counts = counts[counts > 0]
    if counts.size < 2:
        return None
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def first_run_info(run: RunData) -> dict:
    """The first ``stability/run_info`` record; else what Keras' TensorBoard callback
    recorded of the compiled model (`RunData.model_config`, the same field names)."""
    records = run.json.get("stability/run_info") or []
    if records and isinstance(records[0][1], dict):
        return records[0][1]
    return run.model_config


def accumulation_steps(run: RunData) -> int:
    """``gradient_accumulation_steps`` from the optimizer's config (1 if unset)."""
    _, config = optimizer_of(first_run_info(run))
    try:
        return max(1, int(config.get("gradient_accumulation_steps") or 1))
    except (TypeError, ValueError, AttributeError):
        return 1
