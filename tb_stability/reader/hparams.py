"""The hyperparameters a run recorded for TensorBoard's HParams dashboard.

``hp.hparams({...})`` (``tensorboard.plugins.hparams.api``, also used by
Keras Tuner) writes one summary, tag ``_hparams_/session_start_info``, whose
metadata content is an ``HParamsPluginData`` holding the session's
hyperparameters. Only that metadata is read: the decoder keeps every tag's
metadata (`decode.FileState.meta`), so nothing else has to be parsed.
"""

from __future__ import annotations

from typing import Any

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
