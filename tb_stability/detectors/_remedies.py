"""The optimizer calls and learning rates the detectors' remedies suggest.

A remedy's snippet names the run's own optimizer class with its momentum and
weight decay kept (`optimizer_call`), at a learning rate worked out from the
run's own (`lowered_rate`, `raised_learning_rate`), and says whether clipping
or gradient accumulation is already configured.
"""

from __future__ import annotations

import math

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.detectors import _layer_kinds
from tb_stability.rundata import RunData

MAX_SUGGESTED_LR = 1e-2
NOT_A_RAISE = 1.5
TIGHT_CLIPVALUE = 1e-4  # clipvalue / median gradient norm: every element of a gradient clipped
TIGHT_CLIPNORM = 1e-2  # clipnorm / median gradient norm: every update scaled down >= 100x


def zero_gradient_causes(run: RunData) -> str:
    """Where (near) zero gradients come from when the learning rate is already large.

    A rate this large can kill ReLU units, so lowering it is part of the fix
    where the model has ReLU-family layers (or none are recorded); in a model
    whose recorded layers have none, no unit died of it and a lower rate would
    only slow training further.
    """
    causes = ("look for dead or saturated units (the dead_units and saturated_activations "
              "findings), layers left at trainable=False, or a loss that does not depend on them")
    table = _layer_kinds.layer_activations(run)
    if table and not any(entry.get("kind") == "relu" for entry in table.values()):
        return (f"{causes}, or a loss scaled far down (a small loss weight, or a sum divided by "
                "a large count, makes every gradient as small). The model has no ReLU-family "
                "layer, so no unit died of the rate: keep it.")
    return (
        f"{causes}. A learning rate this large can itself kill ReLU units: lower it and retrain "
        "from a fresh initialisation:\n"
        f"    optimizer = {lowered_optimizer_call(run, 10.0)}"
    )


def raised_learning_rate(lr, factor: float) -> tuple[float | None, float | None]:
    """``(new_lr, effective factor)`` to suggest when the updates are too small.

    The suggestion is ``lr * factor`` capped at `MAX_SUGGESTED_LR` and rounded;
    the factor is the one that cap leaves (so the text and the snippet agree).
    ``(1e-3, None)`` when the learning rate is unknown; ``(None, None)`` when it
    is already at or above the cap: then tiny updates mean tiny gradients, and
    raising it is not the fix (`zero_gradient_causes`).
    """
    try:
        lr = float(lr)
    except (TypeError, ValueError):
        return 1e-3, None
    if not math.isfinite(lr) or lr <= 0:
        return 1e-3, None
    new = C.round_sig(min(lr * factor, MAX_SUGGESTED_LR), 1)
    if new <= lr * NOT_A_RAISE:  # 0.01 logged as float32 is 0.0099999998: not "raise ~1x"
        return None, None
    return new, C.round_sig(new / lr, 2)


KERAS_OPTIMIZERS = frozenset({
    "SGD", "Adam", "AdamW", "Adamax", "Nadam", "RMSprop", "Adagrad", "Adadelta", "Ftrl", "Lion",
    "Lamb", "Adafactor", "Muon"})
ADAPTIVE_OPTIMIZERS = KERAS_OPTIMIZERS - {"SGD"}  # per-weight step sizes
KEPT_OPTIMIZER_SETTINGS = ("momentum", "nesterov", "weight_decay")


def recorded_optimizer(run: RunData) -> tuple[str, dict]:
    """``(class name, config)`` of the run's optimizer (the inner one under loss scaling).

    Where run_info records none (an ordinary TensorBoard log), the compiled
    model Keras' TensorBoard callback recorded (`RunData.model_config`) or
    the run's hyperparameters (`RunData.hparams`: ``optimizer="sgd"``, with
    ``momentum`` beside it) may name it; else ``("Adam", {})``.
    """
    for info in (C.latest_run_info(run, "optimizer"), run.model_config):
        name, config = C.optimizer_of(info)
        if isinstance(name, str) and name.isidentifier():
            return _KERAS_NAMES.get(name.lower(), name), config
    return _hparams_optimizer(run)


_KERAS_NAMES = {name.lower(): name for name in KERAS_OPTIMIZERS}  # compile("adam")


OPTIMIZER_HPARAMS = ("optimizer", "optim", "opt")


def _hparams_optimizer(run: RunData) -> tuple[str, dict]:
    """``(Keras class name, kept settings)`` from the run's hparams; ``("Adam", {})`` if none."""
    for key in OPTIMIZER_HPARAMS:
        value = run.hparams.get(key)
        name = _KERAS_NAMES.get(value.strip().lower()) if isinstance(value, str) else None
        if name:
            config = {k: run.hparams[k] for k in KEPT_OPTIMIZER_SETTINGS
                      if isinstance(run.hparams.get(k), (int, float))}
            return name, config
    return "Adam", {}


def optimizer_call(run: RunData, args: str) -> str:
    """``keras.optimizers.<the run's optimizer>(args)``, keeping its momentum and weight decay.

    A learning rate worked out from the run's own is a rate for the optimizer
    it was measured with: 0.2 is a cut for SGD at 2.0 and a disaster for Adam.
    So a remedy names the run's optimizer class (Adam for an ordinary log),
    and carries over the settings in `KEPT_OPTIMIZER_SETTINGS` that ``args``
    does not set.
    """
    name, config = recorded_optimizer(run)
    parts = [args.strip().rstrip(",").strip()] if args.strip() else []
    for key in KEPT_OPTIMIZER_SETTINGS:
        value = config.get(key)
        if value in (None, False, 0, 0.0) or f"{key}=" in args:
            continue
        parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value!r}")
    prefix = "keras.optimizers." if name in KERAS_OPTIMIZERS else ""
    return f"{prefix}{name}({', '.join(parts)})"


def lowered_optimizer_call(run: RunData, factor: float, extra: str = "",
                           default_lr: float = 1e-4) -> str:
    """`optimizer_call` with the run's learning rate (its first logged one) lowered ``factor``x.

    ``default_lr`` where the run logged no learning rate (an ordinary log's
    Adam); the optimizer's default where the lowered rate is still above its
    usual range (`lowered_rate_for`). ``extra`` are further arguments, e.g.
    ``"clipnorm=1"``.
    """
    new_lr, note = lowered_rate_for(run, C.lr_at(run, None), factor, default_lr)
    args = ", ".join(a for a in (f"learning_rate={new_lr:g}", extra) if a)
    return optimizer_call(run, args) + note


def lowered_rate(lr: float | None, factor: float, default_lr: float = 1e-4) -> float:
    """``lr / factor`` to two significant digits; ``default_lr`` where ``lr`` is unknown."""
    return C.round_sig(lr / factor) if lr and math.isfinite(lr) and lr > 0 else default_lr


# Keras' default learning rate of the optimizers with per-weight step sizes of
# about the learning rate: each weight moves by up to ~lr per step, so above
# USUAL_RANGE x the default they are rarely stable whatever the model.
DEFAULT_LR = {"Adam": 1e-3, "AdamW": 1e-3, "Adamax": 1e-3, "Nadam": 1e-3, "RMSprop": 1e-3}
USUAL_RANGE = 10.0


def lowered_rate_for(run: RunData, lr: float | None, factor: float,
                     default_lr: float = 1e-4) -> tuple[float, str]:
    """``(rate, note)``: `lowered_rate`, or the run's optimizer's default where that is too high.

    A cut of ``factor`` from a rate 1000x too large (Adam at 1.0) still
    leaves one 100x too large, and a remedy that suggests it fails again. So
    for the optimizers in `DEFAULT_LR`, a lowered rate above `USUAL_RANGE`
    times their default becomes the default, and ``note`` (a comment for the
    end of the snippet's line) says why; otherwise ``note`` is "".
    """
    new_lr = lowered_rate(lr, factor, default_lr)
    name, _ = recorded_optimizer(run)
    usual = DEFAULT_LR.get(name)
    if usual is None or factor <= 1.0 or new_lr <= USUAL_RANGE * usual:
        return new_lr, ""
    return usual, (f"  # {name}'s default: {factor:g}x lower ({new_lr:g}) is still above its "
                   f"usual range (<= {USUAL_RANGE * usual:g})")


def kept_optimizer_call(run: RunData, extra: str, default_lr: float = 1e-3) -> str:
    """`optimizer_call` at the run's own learning rate (``default_lr`` if unlogged), plus ``extra``."""
    return lowered_optimizer_call(run, 1.0, extra, default_lr)


def or_adaptive(run: RunData) -> str:
    """``" or switch to Adam"`` where the run's optimizer has no per-weight step sizes, else ""."""
    name, _ = recorded_optimizer(run)
    return "" if name in ADAPTIVE_OPTIMIZERS else " or switch to Adam"


def configured_clipping(run: RunData) -> dict:
    """``clipnorm`` / ``global_clipnorm`` / ``clipvalue`` set in run_info's optimizer config."""
    _, config = C.optimizer_of(C.first_run_info(run))
    out = {}
    for key in ("clipnorm", "global_clipnorm", "clipvalue"):
        try:
            value = float(config.get(key))
        except (TypeError, ValueError):
            continue
        if np.isfinite(value) and value > 0:
            out[key] = value
    return out


def tight_clipping(run: RunData) -> tuple[dict, float] | None:
    """``(the clipping, the median pre-clip gradient norm)`` where the clip holds every step back.

    A ``clipvalue`` at or below ``TIGHT_CLIPVALUE`` (1e-4) times the median global
    gradient norm clips every element of any but a vast gradient (an element of a
    gradient of N values is ~norm / sqrt(N)); a ``clipnorm``/``global_clipnorm`` at
    or below ``TIGHT_CLIPNORM`` (1e-2) times it scales every update down 100x or
    more. The logged ``grad_norm`` is the norm before clipping.
    """
    clipping = configured_clipping(run)
    g = C.global_grad_norm(run)
    if not clipping or g is None:
        return None
    values = np.asarray(g.values, dtype=np.float64)
    values = values[np.isfinite(values) & (values > 0)]
    if not values.size:
        return None
    norm = float(np.median(values))
    limits = {"clipvalue": TIGHT_CLIPVALUE, "clipnorm": TIGHT_CLIPNORM, "global_clipnorm": TIGHT_CLIPNORM}
    tight = {k: v for k, v in clipping.items() if v <= limits[k] * norm}
    return (tight, norm) if tight else None


def tight_clipping_remedy(run: RunData) -> str | None:
    """The remedy for steps held back by a clip far below the gradients (`tight_clipping`), or None."""
    found = tight_clipping(run)
    if found is None:
        return None
    tight, norm = found
    lr = C.lr_at(run, None)
    rate = f"learning_rate={C.round_sig(lr, 2):g}, " if lr else ""
    return (
        f"Gradient clipping holds every step back: {clip_text(tight)}, while the gradients' norm "
        f"before clipping is ~{C.fmt(norm)} (median), so each update is a small fraction of what "
        "the learning rate asks. Clip the norm at ~2x its typical value instead:\n"
        f"    optimizer = {optimizer_call(run, f'{rate}clipnorm={C.round_sig(2 * norm):g}')}"
    )


def clip_text(clipping: dict) -> str:
    """``clipnorm=1, clipvalue=0.5`` from `configured_clipping`'s dict."""
    return ", ".join(f"{k}={v:g}" for k, v in clipping.items())


def clip_args(run: RunData, clipnorm: float | None) -> str:
    """The run's own clipping where it sets one, else ``clipnorm=`` ``clipnorm`` (1 if None)."""
    clipping = configured_clipping(run)
    return clip_text(clipping) if clipping else f"clipnorm={clipnorm or 1.0:g}"


# Keras' validation_split takes the last fraction of x and y as given, before any shuffling.
SHUFFLE_BEFORE_SPLIT = (
    "    idx = np.random.default_rng(0).permutation(len(x))\n"
    "    x, y = x[idx], y[idx]\n"
    "    model.fit(x, y, validation_split=0.2, ...)\n"
)
