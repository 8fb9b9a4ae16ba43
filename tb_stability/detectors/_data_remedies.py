"""Remedies for a non-finite value that the forensic re-run found in the batch itself.

The NaN capture (``stability/nan_origin``) names the batch part that holds
NaN/Inf (``origin``: ``inputs``, ``labels`` or ``sample_weights``) and, in
``nonfinite_rows``, the arrays inside it: their path of dict keys and list
indices (``b``, ``0``, ``a/b``; ``""`` for a single array) and rows. The
remedy filters those arrays' rows out, written against the structure the
model is fed (``x["b"]`` for a dict input, ``x[1]`` for a list).
"""

from __future__ import annotations

GENERIC = {
    "inputs": (
        "Clean the input pipeline: drop or impute rows with NaN/Inf before batching:\n"
        "    mask = np.isfinite(x).all(axis=tuple(range(1, x.ndim)))\n"
        "    x, y = x[mask], y[mask]\n"
        "    # tf.data, before .batch(): ds = ds.filter(lambda x, y: tf.reduce_all(tf.math.is_finite(x)))"
    ),
    "labels": (
        "Drop or impute the examples whose labels are NaN/Inf before batching:\n"
        "    mask = np.isfinite(y).all(axis=tuple(range(1, y.ndim)))\n"
        "    x, y = x[mask], y[mask]\n"
        "    # pandas: df = df.dropna(subset=[label_column])"
    ),
    "sample_weights": (
        "Make every sample weight finite: one NaN/Inf weight makes the whole batch's loss "
        "non-finite.\n"
        "    assert np.isfinite(sample_weight).all()\n"
        "    # class_weight: give every class a finite weight"
    ),
}

_ROLE = {"inputs": ("x", "input"), "labels": ("y", "label")}


def data_remedy(origin: dict) -> str:
    """The remedy for a batch part holding NaN/Inf, naming the arrays that do.

    Args:
      origin: A ``stability/nan_origin`` record whose ``origin`` is a key of
        `GENERIC`.

    Returns:
      Text with a snippet: a mask over the named arrays' rows, applied to the
      whole ``(x, y)`` structure, and the same filter for a ``tf.data``
      pipeline; `GENERIC`'s text where the part is one unnamed array.
    """
    kind = origin.get("origin")
    names = [str(entry.get("name") or "") for entry in origin.get("nonfinite_rows") or []
             if isinstance(entry, dict)]
    if kind not in _ROLE or not any(names):
        return GENERIC[kind]
    var, word = _ROLE[kind]
    unique = list(dict.fromkeys(names))
    parts = [_subscript(var, name) for name in unique]
    shown = ", ".join(unique)
    several = len(parts) > 1
    lines = [f"Drop or impute the rows where {word}{'s' if several else ''} {shown} "
             f"hold{'' if several else 's'} NaN/Inf before batching, from every part of the "
             "batch at once:"]
    if len(parts) == 1:
        lines.append(f"    mask = np.isfinite({parts[0]}).reshape(len({parts[0]}), -1).all(axis=1)")
    else:
        lines.append(f"    mask = np.ones(len({parts[0]}), bool)")
        lines.append(f"    for part in ({', '.join(parts)}):")
        lines.append("        mask &= np.isfinite(part).reshape(len(part), -1).all(axis=1)")
    lines.append("    x, y = keras.tree.map_structure(lambda v: v[mask], (x, y))")
    test = " & ".join(f"tf.reduce_all(tf.math.is_finite({p}))" for p in parts)
    lines.append(f"    # tf.data, before .batch(): ds = ds.filter(lambda x, y: {test})")
    return "\n".join(lines)


def _subscript(var: str, name: str) -> str:
    """``x["b"]`` for the path ``b``, ``x[1]`` for ``1``, ``x["a"]["b"]`` for ``a/b``."""
    if not name:
        return var
    keys = name.split("/")
    return var + "".join(f"[{key}]" if key.isdigit() else f"[{key!r}]" for key in keys)
