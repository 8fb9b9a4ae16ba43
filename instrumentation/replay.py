"""``tb-stability replay RUN_DIR [--model FILE]``: re-run the first non-finite step.

Loads ``RUN_DIR/nan_origin/`` (written by the callback or the monitor at the
first non-finite loss or gradient: ``batch.npz``, ``nan_origin.json``,
``model.keras``), takes the saved model or the one given with ``--model``
(a ``.keras`` file, or ``module.py:function`` returning a compiled model),
sets the weights from before the step (by variable path, else by order and
shape), re-runs the step eagerly with `instrumentation.nan_origin.find_origin`
and prints the origin next to the recorded one. A custom loop's step
(`StabilityMonitor`) is re-run with its loss: the Keras loss name it was
recorded with, or ``--loss`` (a Keras name, or ``module.py:NAME`` naming the
loss function, for a hand-written one).

Exit status: 0 when the replayed origin equals the recorded one, 1 when it
differs, 2 on usage or I/O errors.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional, Sequence

from instrumentation.nan_origin import (ARTIFACT_DIR, describe, find_origin, load_artifacts,
                                        loss_callable, loss_from_config, rebuild,
                                        variable_path)


class ReplayError(Exception):
    """A usage or I/O problem (exit status 2)."""


def artifact_dir(run_dir: str) -> str:
    """The artefact directory of a run (accepts the directory itself too)."""
    for candidate in (os.path.join(run_dir, ARTIFACT_DIR), run_dir):
        if os.path.isfile(os.path.join(candidate, "nan_origin.json")):
            return candidate
    raise ReplayError(f"no {ARTIFACT_DIR}/nan_origin.json under {run_dir!r} "
                      "(the run had no non-finite step, or was not recorded with nan_forensics)")


def load_model(record: dict, model_path: Optional[str]):
    """The model to replay: ``model_path`` (``.keras`` or ``file.py:function``) or the saved one."""
    import keras

    path = model_path or record.get("model_file")
    if not path:
        raise ReplayError("the model could not be saved at training time "
                          f"({record.get('model_error', 'unknown reason')}); pass --model FILE")
    if _names_python(path):
        return _from_file(path)()
    if not os.path.isfile(path):
        raise ReplayError(f"model file not found: {path!r}")
    try:
        return keras.saving.load_model(path)
    except Exception as error:  # noqa: BLE001 - e.g. an unregistered custom loss
        # Keras appends the model's whole config to this message: keep its first sentence.
        reason = str(error).split(" Full object config:", 1)[0].strip()
        if len(reason) > 400:
            reason = reason[:400] + "..."
        raise ReplayError(f"cannot load {path!r}: {type(error).__name__}: "
                          f"{reason.rstrip('.')}. Pass --model FILE.py:FUNCTION (a function "
                          "returning the compiled model)") from error


def _names_python(path: str) -> bool:
    return ":" in path and path.split(":", 1)[0].endswith(".py")


def _from_file(path: str):
    """The object ``NAME`` of ``FILE.py:NAME``."""
    file, name = path.split(":", 1)
    spec = importlib.util.spec_from_file_location("_tb_stability_replay_model", file)
    if spec is None or spec.loader is None:
        raise ReplayError(f"cannot import {file!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, name):
        raise ReplayError(f"{file!r} defines no {name!r}")
    return getattr(module, name)


def load_loss(record: dict, loss_path: Optional[str]):
    """The loss a custom loop's step is re-run with (`StabilityMonitor` records), or None.

    ``loss_path`` (a Keras loss name or ``FILE.py:NAME``) wins over the name
    recorded; a Keras ``Loss`` instance is rebuilt from its recorded config
    (``from_logits`` included); a recorded name that is not a Keras loss (a
    hand-written function) gives None: the re-run then tests the inputs and
    layers only.
    """
    if loss_path:
        loss = _from_file(loss_path) if _names_python(loss_path) else loss_callable(loss_path)
        if loss is None or not callable(loss):
            raise ReplayError(f"not a loss: {loss_path!r} (a Keras loss name or FILE.py:NAME)")
        return loss
    return loss_from_config(record.get("loss_config")) or loss_callable(record.get("loss_name"))


def set_weights(model, names: Sequence[str], weights: Sequence) -> int:
    """Assigns saved weights by variable path, else by position and shape; returns the count."""
    variables = list(model.trainable_variables)
    by_path = {variable_path(v): v for v in variables}
    done = 0
    for i, (name, value) in enumerate(zip(names, weights)):
        target = by_path.get(name)
        if target is None and i < len(variables):
            target = variables[i]
        if target is not None and tuple(target.shape) == tuple(value.shape):
            target.assign(value)
            done += 1
    return done


def replay(run_dir: str, model_path: Optional[str] = None,
           loss_path: Optional[str] = None) -> tuple[dict, dict]:
    """Re-runs the recorded step; returns ``(recorded, replayed)`` origin records."""
    directory = artifact_dir(run_dir)
    record, batch, weights = load_artifacts(directory)
    model = load_model(record, model_path)
    structure = record.get("structure", {})
    x = rebuild(structure.get("x", {"kind": "single"}), batch["x"])
    y = rebuild(structure.get("y", {"kind": "single"}), batch["y"])
    sw = rebuild(structure.get("sw", {"kind": "none"}), batch["sw"])
    if x is None:
        raise ReplayError("the saved batch holds no inputs")
    if not model.built:
        model(x)
    set_weights(model, record.get("weight_names", []), weights)
    via = record.get("replay_with", "compute_loss")
    loss_fn = load_loss(record, loss_path) if via == "loss_fn" else None
    replayed = find_origin(model, x, y, sw, via=via, loss_fn=loss_fn)
    if via == "loss_fn" and loss_fn is None and record.get("loss_name"):
        replayed["hint"] = (f"the run's loss {record['loss_name']!r} is not a Keras loss name: "
                            "pass --loss FILE.py:NAME to re-run it")
    return record, replayed


def same_origin(a: dict, b: dict) -> bool:
    """Whether two origin records name the same origin, layer and variables."""
    return (a.get("origin"), a.get("layer"), list(a.get("variables") or [])) == \
        (b.get("origin"), b.get("layer"), list(b.get("variables") or []))


def main(argv: Sequence[str]) -> int:
    """``replay RUN_DIR [--model FILE] [--loss LOSS]``; returns the exit status."""
    import argparse

    parser = argparse.ArgumentParser(prog="tb-stability replay")
    parser.add_argument("run_dir")
    parser.add_argument("--model", default=None)
    parser.add_argument("--loss", default=None,
                        help="a custom loop's loss: a Keras loss name or FILE.py:NAME")
    args = parser.parse_args(list(argv))
    return run(args.run_dir, args.model, args.loss)


def run(run_dir: str, model_path: Optional[str] = None, loss_path: Optional[str] = None) -> int:
    """Prints the replayed origin; returns 0 (same as recorded), 1 (differs) or 2 (error)."""
    try:
        recorded, replayed = replay(run_dir, model_path, loss_path)
    except (ReplayError, OSError, KeyError, ValueError) as error:
        sys.stderr.write(f"tb-stability: error: {error}\n")
        return 2
    if replayed.get("hint"):
        sys.stderr.write(f"tb-stability: note: {replayed['hint']}\n")
    same = same_origin(recorded, replayed)
    sys.stdout.write(f"step {recorded.get('step')}: {describe(replayed)} "
                     f"({'same as' if same else 'differs from'} recorded: {describe(recorded)})\n")
    return 0 if same else 1
