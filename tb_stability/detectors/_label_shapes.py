"""Labels and predictions whose shapes broadcast into a square in a hand-written loss.

`StabilityMonitor` records the static shapes of the labels and predictions
``observe`` is given (``label_shape``, ``prediction_shape`` in
``stability/run_info``). Labels of shape ``(B,)`` beside predictions of shape
``(B, 1)`` (or the other way round) broadcast to ``(B, B)`` in an elementwise
loss written by hand (``tf.square(y - y_pred)``): every label is compared with
every prediction, and the best the model can do is predict the labels' mean.
Keras' own losses align the two shapes first, so a compiled model is safe.
"""

from __future__ import annotations

from typing import Any

from tb_stability.detectors import _common as C
from tb_stability.rundata import RunData


def _shape(value: Any) -> tuple | None:
    if not isinstance(value, list) or not all(d is None or isinstance(d, int) for d in value):
        return None
    return tuple(value)


def broadcast_pair(run: RunData) -> tuple[tuple, tuple, tuple] | None:
    """``(label shape, prediction shape, their broadcast)`` when a ``(B,)`` and a ``(B, 1)``
    meet; None otherwise (or when the run recorded no shapes)."""
    info = C.latest_run_info(run, "label_shape")
    labels, predictions = _shape(info.get("label_shape")), _shape(info.get("prediction_shape"))
    if labels is None or predictions is None:
        return None
    for flat, column in ((labels, predictions), (predictions, labels)):
        if len(flat) == 1 and column == (flat[0], 1):
            return labels, predictions, (flat[0], flat[0])
    return None


def text(shape: tuple) -> str:
    """``(64, 1)``-style text of a shape, ``None`` for an unknown dimension."""
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def explanation(pair: tuple[tuple, tuple, tuple]) -> str:
    """The sentence naming the broadcast."""
    labels, predictions, square = pair
    return (f" The labels have shape {text(labels)} and the predictions {text(predictions)}: "
            f"a loss written by hand (y - y_pred) broadcasts them to {text(square)}, comparing "
            "every label with every prediction, and the best answer to that is the labels' "
            "mean.")


def remedy(pair: tuple[tuple, tuple, tuple]) -> str:
    """Giving the labels and predictions one shape."""
    labels, predictions, _ = pair
    if len(labels) == 1:
        fix = "y = tf.reshape(y, (-1, 1))  # labels as (batch, 1), like the predictions"
    else:
        fix = "y_pred = tf.reshape(y_pred, (-1, 1))  # predictions as (batch, 1), like the labels"
    return ("Give the labels and the predictions one shape before the loss (or use "
            "keras.losses.MeanSquaredError(), which aligns them itself):\n"
            f"    {fix}\n"
            "    loss = tf.reduce_mean(tf.square(y - y_pred))\n"
            "    # or: loss = keras.losses.MeanSquaredError()(y, y_pred)")
