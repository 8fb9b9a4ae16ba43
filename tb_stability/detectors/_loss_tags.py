"""Which scalar of an ordinary log is the training loss, its validation twin, the gradient norm.

The tag names people give their losses, beside Keras' own (``epoch_loss``,
``batch_loss``, ``epoch_val_loss``): ``loss``, ``train/loss``, ``Loss/train``
and ``Loss/test`` (one chart per quantity), ``Loss/total_loss`` beside
``Loss/classification_loss`` (a detection model's parts), ``train_loss_step``
and ``train_loss_epoch`` beside ``val_loss`` (per step and per epoch),
``trainLoss``. A tag is split into words (at ``/``, ``_``, ``-``, ``.``,
spaces and camelCase humps); it holds a loss when a word ends in ``loss``, a
validation or test loss when a word names a held-out split. A global gradient
norm is a tag whose words name a gradient and a norm (``grad_norm``,
``train/grad_norm``, ``gradients/global_norm``, ``gradient_norm``); a
per-layer one (``grad_norm/dense_1``) is not read as the global norm.
"""

from __future__ import annotations

import math
import re

from tb_stability.rundata import RunData

HELD_OUT_WORDS = frozenset({"val", "valid", "validation", "test", "eval", "evaluation", "dev",
                            "holdout"})
TRAIN_WORDS = frozenset({"train", "training"})
# Words beside "loss" in its own path component that leave it the whole loss
# (`total_loss`, `train_loss_step`), as against one part of it (`rpn_loss`).
WHOLE_LOSS_WORDS = frozenset({"loss", "total", "overall", "train", "training", "step", "batch",
                              "epoch", "avg", "average", "mean", "running", "smoothed", "sum"})
_HUMP = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEPARATORS = re.compile(r"[_\-. :]+")


def components(tag: str) -> list[list[str]]:
    """``tag``'s path components, each as its lower-case words."""
    return [[w for w in _SEPARATORS.split(_HUMP.sub("_", part).lower()) if w]
            for part in tag.split("/")]


def words(tag: str) -> list[str]:
    """All of ``tag``'s lower-case words, in order."""
    return [w for part in components(tag) for w in part]


def is_loss(tag: str) -> bool:
    """True when one of ``tag``'s words ends in ``loss`` (``loss``, ``total_loss``, ``NLLLoss``)."""
    return any(w.endswith("loss") for w in words(tag))


def is_held_out(tag: str) -> bool:
    """True for tags of a validation, test or evaluation split (``val_loss``, ``Loss/test``)."""
    return any(w in HELD_OUT_WORDS for w in words(tag))


def is_part(tag: str) -> bool:
    """True for one named part of a loss (``Loss/classification_loss``, ``rpn_loss``, ``loss/ce``).

    A component that is only ``loss``/``losses`` names a group when a later
    component names something other than the whole loss or a split: ``loss/ce``
    and ``losses/kl`` are parts, ``loss/total`` and ``Loss/train`` are not.
    """
    parts = components(tag)
    for i, part in enumerate(parts):
        if any(w.endswith("loss") for w in part):
            if any(w.endswith("loss") and w != "loss" for w in part):
                return True
            if any(w not in WHOLE_LOSS_WORDS and w not in HELD_OUT_WORDS for w in part):
                return True
        if part and all(w in ("loss", "losses") for w in part) and any(
                w not in WHOLE_LOSS_WORDS and w not in HELD_OUT_WORDS and w not in TRAIN_WORDS
                for later in parts[i + 1:] for w in later):
            return True
    return False


def _core(tag: str) -> tuple[str, ...]:
    """``tag``'s words without the split's name: ``Loss/train`` and ``Loss/test`` share theirs."""
    return tuple(w for w in words(tag) if w not in HELD_OUT_WORDS and w not in TRAIN_WORDS)


def _without_period(core: tuple[str, ...]) -> tuple[str, ...]:
    """``core`` without the words that say how often it is logged (``train_loss_epoch``)."""
    return tuple(w for w in core if w not in ("epoch", "step", "batch"))


def training_loss_tags(run: RunData) -> list[str]:
    """Scalar tags of ``run`` that hold a training loss, most telling first.

    A per-step loss before a per-epoch one, the whole loss before its parts,
    the longer series first, then by name. Keras' own names are not ranked
    here: `_common.loss_series` looks for them first.
    """
    tags = [t for t, s in run.scalars.items() if len(s) and is_loss(t) and not is_held_out(t)]
    return sorted(tags, key=lambda t: ("epoch" in words(t), is_part(t), -len(run.scalars[t]), t))


GENERATOR_WORDS = frozenset({"g", "gen", "generator"})
DISCRIMINATOR_WORDS = frozenset({"d", "dis", "disc", "discriminator", "critic"})


def adversarial_losses(run: RunData) -> tuple[str, str] | None:
    """``(generator tag, discriminator tag)`` when ``run`` logs a GAN's two training losses.

    A generator's loss (``g_loss``, ``gen_loss``, ``Loss_G``, ``loss/generator``)
    beside a discriminator's or critic's (``d_loss``, ``disc_loss``, ``Loss_D``,
    ``critic_loss``); the first of each in `training_loss_tags` order. Their
    players trade off by design, so neither is a loss that should fall.
    """
    tags = training_loss_tags(run)
    generator = [t for t in tags if set(words(t)) & GENERATOR_WORDS]
    discriminator = [t for t in tags if set(words(t)) & DISCRIMINATOR_WORDS]
    if not generator or not discriminator:
        return None
    return generator[0], discriminator[0]


def validation_loss_tags(run: RunData, twin_of: str | None = None) -> list[str]:
    """Scalar tags of ``run`` that hold a validation or test loss, best first.

    Args:
      run: The run.
      twin_of: A training loss tag; its twin (``Loss/test`` for ``Loss/train``,
        ``val_loss`` for ``train_loss_epoch``'s words without ``epoch`` too)
        comes first.
    """
    core = _core(twin_of) if twin_of else None
    loose = _without_period(core) if core else None

    def rank(tag):
        mine = _core(tag)
        return (mine != core, _without_period(mine) != loose, is_part(tag),
                -len(run.scalars[tag]), tag)

    tags = [t for t, s in run.scalars.items() if len(s) and is_loss(t) and is_held_out(t)]
    return sorted(tags, key=rank)


GRADIENT_WORDS = frozenset({"grad", "grads", "gradient", "gradients"})
NORM_WORDS = frozenset({"norm", "globalnorm", "l2", "l2norm"})
# Words that leave a gradient norm tag the global one (`train/grad_norm`).
WHOLE_NORM_WORDS = (GRADIENT_WORDS | NORM_WORDS | TRAIN_WORDS
                    | frozenset({"global", "total", "step", "batch", "before", "clip", "clipping",
                                 "unclipped", "pre", "raw", "model"}))


def gradient_norm_tag(run: RunData) -> str | None:
    """The scalar tag of ``run`` that holds the global gradient norm, if one does.

    Its words name a gradient and a norm and nothing else but the split or a
    qualifier (`WHOLE_NORM_WORDS`): ``grad_norm``, ``train/grad_norm``,
    ``gradients/global_norm``, ``grad_norm/before_clip``. Held-out splits and
    per-layer norms (a layer's name among the words) are not. The longest
    series wins, then the name.
    """
    found = []
    for tag, series in run.scalars.items():
        names = set(words(tag))
        if (len(series) and names & GRADIENT_WORDS and names & NORM_WORDS
                and names <= WHOLE_NORM_WORDS):
            found.append(tag)
    return min(found, key=lambda t: (-len(run.scalars[t]), t)) if found else None


LR_WORDS = frozenset({"lr", "learningrate"})
# Words that make a learning-rate tag something else (`lr_scale`, `lr_decay_steps`).
NOT_LR_WORDS = frozenset({"scale", "scaler", "decay", "factor", "multiplier", "mult", "warmup",
                          "steps", "schedule", "min", "max", "ratio", "finder"})
# Words beside a learning rate that leave it the learning rate (`epoch_learning_rate`, `train/lr`).
LR_QUALIFIERS = HELD_OUT_WORDS | TRAIN_WORDS | frozenset({"epoch", "optimizer"})
PLAIN_LR_TAGS = ("learning_rate", "epoch_learning_rate", "lr")


def _names_lr(part: list[str]) -> bool:
    """Whether one path component's words name a learning rate (`learning_rate_tag`)."""
    named = [w for w in part if w not in LR_QUALIFIERS]
    if named[:2] == ["learning", "rate"]:
        named = ["lr"] + named[2:]
    return bool(named) and named[0] in LR_WORDS and not set(named) & NOT_LR_WORDS


def learning_rate_tag(run: RunData) -> str | None:
    """The scalar tag of ``run`` that holds the learning rate, if one does.

    A path component names it: ``learning_rate``, ``lr``, ``LearningRate``,
    ``epoch_learning_rate``, ``train/lr``, ``lr-Adam`` (one per optimizer),
    ``lr/group0`` (one per parameter group: the first by name); not
    ``lr_scale`` or ``lr_decay_steps`` (`NOT_LR_WORDS`). Plain ``learning_rate``
    and ``lr`` come first, then the longest series, then the name.
    """
    found = [tag for tag, series in run.scalars.items() if len(series) and _is_lr_name(tag)]
    return min(found, key=lambda t: (_plain_lr_rank(t), -len(run.scalars[t]), t)) if found else None


def _is_lr_name(name: str) -> bool:
    """Whether a tag or hyperparameter name names a learning rate (one of its components does)."""
    return any(_names_lr(part) for part in components(name))


def _plain_lr_rank(name: str) -> int:
    """The position of ``name`` in `PLAIN_LR_TAGS` (after them when it is not one)."""
    return PLAIN_LR_TAGS.index(name) if name in PLAIN_LR_TAGS else len(PLAIN_LR_TAGS)


def learning_rate_hparam(run: RunData) -> float | None:
    """The learning rate among ``run``'s hyperparameters (`RunData.hparams`), if one is.

    Named as `learning_rate_tag` names a scalar (``learning_rate``, ``lr``,
    ``optimizer/lr``; not ``lr_decay``), a positive finite number; plain
    ``learning_rate`` and ``lr`` first, then the name.
    """
    found = {name: value for name, value in run.hparams.items()
             if is_positive_number(value) and _is_lr_name(name)}
    if not found:
        return None
    return float(found[min(found, key=lambda n: (_plain_lr_rank(n), n))])


def is_positive_number(value) -> bool:
    """Whether a recorded setting is a positive finite number (not a bool, a string or a dict)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)
