"""What kind of layer a finding names, from run_info's ``layer_activations``.

The instrumentation records, per layer path, the layer's class and activation
(`instrumentation.config_check.layer_activations`). A finding's layer is a
variable-path prefix (``sequential/lstm/lstm_cell``); `describe` finds the
recorded layer whose path is the longest prefix of it. Logs written before
that record existed, or by other tools, fall back to the Keras layer names
(``lstm_cell``, ``gru``, ``simple_rnn``) to tell recurrent layers apart.
"""

from __future__ import annotations

import re
from typing import Optional

from tb_stability.detectors import _common as C
from tb_stability.rundata import RunData

_RECURRENT_CLASSES = {"LSTM": "LSTM", "LSTMCell": "LSTM", "GRU": "GRU", "GRUCell": "GRU",
                      "SimpleRNN": "SimpleRNN", "SimpleRNNCell": "SimpleRNN"}
_RECURRENT_NAMES = (("lstm", "LSTM"), ("gru", "GRU"), ("simple_rnn", "SimpleRNN"))
_NAME_PART = re.compile(r"[^/]+")
# The activation Keras' recurrent layers apply to the cell state by default.
_RECURRENT_DEFAULT = "tanh"


def layer_activations(run: RunData) -> dict:
    """``{layer path: {"class", "activation", "kind", ...}}`` recorded for ``run`` ({} if none)."""
    table = C.latest_run_info(run, "layer_activations").get("layer_activations")
    if not isinstance(table, dict):
        return {}
    return {str(k): v for k, v in table.items() if isinstance(v, dict)}


def describe(table: dict, layer: str) -> Optional[dict]:
    """The recorded entry of the layer whose path is the longest prefix of ``layer``."""
    best, best_len = None, -1
    for path, entry in table.items():
        if (layer == path or layer.startswith(path + "/")) and len(path) > best_len:
            best, best_len = entry, len(path)
    return best


def describe_named(table: dict, name: str) -> Optional[dict]:
    """The recorded entry of the layer a probe names (its layer name, or a path ending in it).

    Probes are named by layer (``gru_1``), the table by variable path
    (``sequential/gru_1``, ``sequential/gru_1/gru_cell``): the shortest path
    ending in ``name`` is the layer itself rather than its cell.
    """
    paths = [path for path in table if path == name or path.endswith("/" + name)]
    return table[min(paths, key=len)] if paths else None


def recurrent_class(layer: str, entry: Optional[dict]) -> Optional[str]:
    """``"LSTM"``/``"GRU"``/``"SimpleRNN"`` when ``layer`` is a recurrent layer, else None."""
    if entry is not None and entry.get("class") in _RECURRENT_CLASSES:
        return _RECURRENT_CLASSES[entry["class"]]
    if entry is not None and entry.get("class"):
        return None
    for part in reversed(_NAME_PART.findall(layer)):
        for prefix, name in _RECURRENT_NAMES:
            if part == prefix or part.startswith(prefix + "_"):
                return name
    return None


def recurrent_remedy(layers: list[str], table: dict,
                     optimizer: str = "keras.optimizers.Adam(1e-3, clipnorm=1)") -> Optional[str]:
    """A fix for vanishing gradients through recurrent ``layers`` (None if none is recurrent).

    Args:
      layers: The flagged layers (variable-path prefixes).
      table: `layer_activations` of the run.
      optimizer: The optimizer snippet to end with (the run's own, with clipping).
    """
    described = [(layer, describe(table, layer)) for layer in layers]
    recurrent = [(layer, entry, recurrent_class(layer, entry)) for layer, entry in described]
    recurrent = [item for item in recurrent if item[2] is not None]
    if not recurrent:
        return None
    _, entry, kind = recurrent[0]
    entry = entry or {}
    units = entry.get("units") if isinstance(entry.get("units"), int) else 32
    activation = entry.get("activation")
    listed = ", ".join(name for name, _, _ in recurrent[:4])
    lines = []
    if activation and activation != _RECURRENT_DEFAULT:
        why = (" (its derivative is at most 0.25, so the gradient shrinks at every time "
               "step and every stacked layer)" if activation == "sigmoid" else "")
        lines.append(f"In {listed}: the recurrence uses activation='{activation}'{why}. Use "
                     f"Keras' default activation='{_RECURRENT_DEFAULT}' (or 'relu' with "
                     "gradient clipping), and clip the gradient norm:")
    else:
        lines.append(f"In {listed}: stack fewer recurrent layers or add residual connections "
                     "between them, normalise between them, and clip the gradient norm:")
    lines += [
        f"    keras.layers.{kind}({units}, return_sequences=True)"
        f"  # activation='{_RECURRENT_DEFAULT}', the default",
        f"    x = keras.layers.Add()([x, keras.layers.{kind}({units}, return_sequences=True)(x)])"
        "  # residual",
        "    x = keras.layers.LayerNormalization()(x)",
        f"    optimizer = {optimizer}",
    ]
    return "\n".join(lines)


def activations_of(layers: list[str], table: dict) -> dict:
    """``{layer: activation name}`` for the ``layers`` the table describes."""
    out = {}
    for layer in layers:
        entry = describe(table, layer)
        if entry is not None and entry.get("activation"):
            out[layer] = str(entry["activation"])
    return out
