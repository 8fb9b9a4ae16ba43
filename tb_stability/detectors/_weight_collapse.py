"""Kernels pulled to zero: the cause of a vanishing gradient that no activation change fixes.

A weight decay or L2 penalty far too strong for the learning rate shrinks
every kernel geometrically (Keras applies ``w -= learning_rate *
weight_decay * w`` at each step), and a gradient that flows through
near-zero kernels vanishes with them. The vanishing_gradients finding then
points at the activations, which are not the cause. `collapsed_kernels`
finds the kernels whose recorded norm ended below ``COLLAPSE`` (1/100) of its
first recorded value; `explain` turns them into a sentence and a remedy that
names the optimizer's weight decay when it has one.

A decay short of that collapse can still hold the model at its base rate: at
``learning_rate * weight_decay`` >= ``STRONG_DECAY`` (1e-3 of every weight
per step, 250x AdamW's default at 1e-3) with a kernel below ``SHRUNK`` (1/2)
of its start, `cause` names the decay as well (AdamW at ``weight_decay=50``
and 1e-2 keeps a regression model at the labels' mean with its kernels at
1/15 of their start).
"""

from __future__ import annotations

from tb_stability.detectors import _common as C
from tb_stability.detectors import _loss_tags as L
from tb_stability.detectors import _remedies as remedies
from tb_stability.rundata import RunData

COLLAPSE = 1e-2
DECAY_PER_STEP = 1e-4  # learning_rate * weight_decay the remedy aims at (AdamW's default: 4e-6)
STRONG_DECAY = 1e-3
SHRUNK = 0.5


def collapsed_kernels(run: RunData, layers=None, below: float = COLLAPSE) -> dict[str, tuple[float, float]]:
    """``{kernel: (first norm, last norm)}`` for the kernels of ``layers`` (None: all) whose
    norm ended below ``below`` x its first."""
    wanted = set(layers) if layers is not None else None
    out = {}
    for name, finite in C.finite_weight_norms(run):
        if wanted is not None and ("/" not in name or name.rsplit("/", 1)[0] not in wanted):
            continue
        if finite.size < 2 or not finite[0] > 0:
            continue
        if finite[-1] < below * finite[0]:
            out[name] = (float(finite[0]), float(finite[-1]))
    return out


def _decay(run: RunData) -> tuple[float | None, float | None]:
    """``(weight_decay, learning_rate)`` of the run's optimizer; None where not recorded."""
    _, config = remedies.recorded_optimizer(run)
    decay, lr = (float(v) if L.is_positive_number(v) else None
                 for v in (config.get("weight_decay"), config.get("learning_rate")))
    return decay, C.lr_at(run, None) or lr


def _decay_texts(run: RunData, decay: float, lr: float) -> tuple[str, str]:
    """``(sentence, remedy)`` on a weight decay too strong for the learning rate."""
    target = C.round_sig(min(decay, DECAY_PER_STEP / lr))
    return (
        f" weight_decay={decay:g} at learning rate {lr:g} takes {lr * decay:.2g} of every weight "
        "away at each step (w -= learning_rate * weight_decay * w), faster than the gradients "
        "can put it back.",
        f"Lower the weight decay so that learning_rate x weight_decay is about "
        f"{DECAY_PER_STEP:g} per step or less (AdamW's default is 0.004):\n"
        "    optimizer = "
        + remedies.optimizer_call(run, f"learning_rate={lr:g}, weight_decay={target:g}"),
    )


def explain(run: RunData, collapsed: dict[str, tuple[float, float]]) -> tuple[str, str]:
    """``(explanation sentence, remedy)`` for collapsed kernels (see module docstring)."""
    name, (first, last) = min(collapsed.items(), key=lambda item: item[1][1] / item[1][0])
    shrank = (f" The kernels themselves collapsed: {name}'s norm fell from {C.fmt(first)} to "
              f"{C.fmt(last)} ({C.fmt(last / first)}x), and a gradient that flows through "
              "near-zero weights vanishes with them.")
    decay, lr = _decay(run)
    if decay and lr:
        because, remedy = _decay_texts(run, decay, lr)
        return shrank + because, remedy
    return (
        shrank + " Something pulls the weights to zero faster than the gradients move them: "
        "a large L2 penalty (kernel_regularizer) or weight decay.",
        "Lower the L2 factor of the kernel regularizers (1e-4 is typical), or the optimizer's "
        "weight_decay:\n"
        "    keras.layers.Dense(64, kernel_regularizer=keras.regularizers.L2(1e-4))",
    )


def cause(run: RunData) -> tuple[str, str, dict] | None:
    """``(sentence, remedy, evidence)`` when any kernel of the model collapsed, or a weight
    decay of at least `STRONG_DECAY` per step holds one below `SHRUNK` of its start; else None.

    For the rules that see a model which learned nothing (a loss at the labels'
    entropy or variance, predictions collapsed to one class) and would
    otherwise blame the labels or the class balance.
    """
    collapsed = collapsed_kernels(run)
    if collapsed:
        because, remedy = explain(run, collapsed)
        return because, remedy, {"collapsed_kernels": {k: [first, last]
                                                       for k, (first, last) in collapsed.items()}}
    decay, lr = _decay(run)
    held = collapsed_kernels(run, below=SHRUNK) if decay and lr and decay * lr >= STRONG_DECAY else {}
    if not held:
        return None
    name, (first, last) = min(held.items(), key=lambda item: item[1][1] / item[1][0])
    because, remedy = _decay_texts(run, decay, lr)
    because += (f" It holds the kernels near zero ({name}'s norm fell from {C.fmt(first)} to "
                f"{C.fmt(last)}, {C.fmt(last / first)}x), so the model can do little more than "
                "output a constant.")
    return because, remedy, {"decayed_kernels": {k: [a, b] for k, (a, b) in held.items()},
                             "decay_per_step": decay * lr}


def blame(pulled: tuple[str, str, dict] | None, explanation: str, remedy: str,
          evidence: dict) -> tuple[str, str, dict]:
    """``(explanation, remedy, evidence)`` with a `cause` result (``pulled``) named: its
    sentence added, its remedy in place of ``remedy``, its evidence added; unchanged for None."""
    if pulled is None:
        return explanation, remedy, evidence
    because, decay_remedy, extra = pulled
    return explanation + because, decay_remedy, {**evidence, **extra}
