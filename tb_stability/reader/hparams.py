"""The hyperparameters a run recorded for TensorBoard's HParams dashboard.

``hp.hparams({...})`` (``tensorboard.plugins.hparams.api``, also used by
Keras Tuner) writes one summary, tag ``_hparams_/session_start_info``, whose
metadata content is an ``HParamsPluginData`` holding the session's
hyperparameters. Only that metadata is read: the decoder keeps every tag's
metadata (`decode.FileState.meta`), so nothing else has to be parsed.

PyTorch's ``SummaryWriter.add_hparams`` writes the same summary into a child
run named by the time it was called (``run/1700000000.1234567``), not into
the run that trained: `adopt_timestamped_sessions` hands such a child's
hyperparameters to its parent run when the parent recorded none itself.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from tb_stability.rundata import RunData

# `str(time.time())`, the name add_hparams gives its child run by default.
TIMESTAMP_RUN = re.compile(r"\d{9,11}(\.\d+)?")

SESSION_START_TAG = "_hparams_/session_start_info"
PLUGIN_NAME = "hparams"


def session_hparams(meta: dict[str, tuple[str, bytes]], label: str,
                    warnings: list[str]) -> dict[str, Any]:
    """``name -> value`` (float, str or bool) of the session a file started, or ``{}``.

    Args:
      meta: The file's tag -> (plugin name, content) (`decode.FileState.meta`).
      label: How a warning names the file.
      warnings: Where an undecodable record is reported (the run's warnings).
    """
    plugin, content = meta.get(SESSION_START_TAG, (None, b""))
    if plugin != PLUGIN_NAME:
        return {}
    try:
        from tensorboard.plugins.hparams import plugin_data_pb2

        data = plugin_data_pb2.HParamsPluginData.FromString(content)
    except Exception as error:  # a corrupt or foreign record: say so, keep the rest
        warnings.append(f"{label}: could not decode the hparams session ({error}); ignored it")
        return {}
    if not data.HasField("session_start_info"):
        return {}
    out: dict[str, Any] = {}
    for name, value in data.session_start_info.hparams.items():
        kind = value.WhichOneof("kind")
        if kind in ("number_value", "string_value", "bool_value"):
            out[str(name)] = getattr(value, kind)
    return out


def adopt_timestamped_sessions(runs: Mapping[str, RunData]) -> dict[str, RunData]:
    """Parents given the hyperparameters of their timestamp-named child runs.

    Args:
      runs: Run name -> run, as loaded.

    Returns:
      ``name -> run`` for each parent run without hyperparameters of its own
      that has a child named like a Unix time (`TIMESTAMP_RUN`) holding some:
      a copy of the parent (arrays shared) with the latest such child's.
      The loaded runs are not changed.
    """
    latest: dict[str, tuple[float, RunData]] = {}
    for name, run in runs.items():
        parent, _, leaf = name.rpartition("/")
        parent = parent or "."
        if not run.hparams or not TIMESTAMP_RUN.fullmatch(leaf) or parent not in runs:
            continue
        if runs[parent].hparams:
            continue
        if parent not in latest or float(leaf) > latest[parent][0]:
            latest[parent] = (float(leaf), run)
    return {parent: dataclasses.replace(runs[parent], hparams=dict(child.hparams))
            for parent, (_, child) in latest.items()}
