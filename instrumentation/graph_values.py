"""Tensors and variables of the statistics: names, norms, counts, plain variables.

Small graph-side helpers shared by `instrumentation.stats` (the per-step and
per-variable statistics) and its neighbours: a variable's stable name and
identity keys, a gradient's dense values, its half sum of squares (one fused
``L2Loss``; under XLA on a CPU a product with ones), its non-finite count,
and the plain (never mirrored) variables the statistics live in.
"""

from __future__ import annotations

from typing import Any, Sequence

import tensorflow as tf


def variable_name(variable: Any) -> str:
    """A stable, human-readable name of a Keras or TF variable (its path)."""
    for attr in ("path", "name"):
        name = getattr(variable, attr, None)
        if isinstance(name, str) and name:
            return name[:-2] if name.endswith(":0") else name
    return f"variable_{id(variable)}"


def tf_variable(variable: Any) -> Any:
    """The `tf.Variable` behind a Keras variable (its ``value``), else ``variable`` itself."""
    inner = getattr(variable, "value", None)
    return inner if isinstance(inner, tf.Variable) else variable


def variable_keys(variable: Any) -> list[int]:
    """Identity keys under which a variable may be passed to the optimizer."""
    inner = tf_variable(variable)
    return [id(variable)] if inner is variable else [id(variable), id(inner)]


def dense_values(tensor: Any) -> tf.Tensor:
    """Dense values of a gradient (the ``values`` of an `IndexedSlices`)."""
    if isinstance(tensor, tf.IndexedSlices):
        tensor = tensor.values
    return tf.convert_to_tensor(tensor)


XLA_NORM_WIDTH = 256
"""Row length of the matrix-vector product that sums squares under XLA (0: ``L2Loss``)."""


def half_sum_squares(tensor: Any, xla: bool = False) -> tf.Tensor:
    """``sum(g**2) / 2`` in float32.

    One fused ``L2Loss`` op, no temporary. XLA on a CPU reduces slowly: the
    MLP's ~350,000 gradient values took ~350 µs per step on a 2-core CPU,
    7 % of its step. There a large tensor's squares are summed by a product
    with a vector of ones instead, in rows of `XLA_NORM_WIDTH` values
    (~140 µs). On a GPU XLA's fused reduction is kept.

    Args:
      xla: Whether the graph being traced is compiled by XLA.
    """
    values = tf.cast(dense_values(tensor), tf.float32)
    size = values.shape.num_elements()
    width = XLA_NORM_WIDTH
    if not xla or not width or size is None or size < 4 * width or not _on_cpu(values):
        return tf.nn.l2_loss(values)
    squares = tf.square(tf.reshape(values, [-1]))
    if size % width:
        squares = tf.pad(squares, [[0, width - size % width]])
    row_sums = tf.matmul(tf.reshape(squares, [-1, width]), tf.ones([width, 1], tf.float32))
    return 0.5 * tf.reduce_sum(row_sums)


def _on_cpu(tensor: tf.Tensor) -> bool:
    """Whether ``tensor`` is computed on a CPU (unplaced: when no GPU is visible)."""
    device = (getattr(tensor, "device", "") or "").upper()
    if "GPU" in device or "TPU" in device:
        return False
    if "CPU" in device:
        return True
    return not tf.config.list_logical_devices("GPU")


def count_nonfinite(tensor: Any) -> tf.Tensor:
    """Number of non-finite values of a gradient, as a float64 scalar."""
    values = dense_values(tensor)
    if not values.dtype.is_floating:
        return tf.constant(0.0, tf.float64)
    bad = tf.logical_not(tf.math.is_finite(values))
    return tf.cast(tf.math.count_nonzero(bad, dtype=tf.int64), tf.float64)


def plain_variable(initial_value: Any, name: str, shape: Any = None) -> tf.Variable:
    """A non-trainable resource variable that ignores any ``tf.distribute`` scope.

    Statistics variables must stay ordinary (not mirrored) variables: each
    replica writes the same aggregated values into them without a collective,
    and every worker reads its own copy on the host. Constructing the
    `ResourceVariable` class directly bypasses the variable-creator scopes a
    strategy installs.
    """
    from tensorflow.python.ops import resource_variable_ops  # no public equivalent

    return resource_variable_ops.ResourceVariable(
        initial_value, trainable=False, name=name, shape=shape
    )


def float64_scalar(value: Any) -> tf.Tensor:
    """A float64 scalar tensor (no op for what already is one)."""
    value = tf.convert_to_tensor(value)
    if value.shape.rank != 0:
        value = tf.reshape(value, [])
    return tf.cast(value, tf.float64)


def norms_from_halves(halves: Sequence[tf.Tensor]) -> tf.Tensor:
    """``[sqrt(2 * h) for h in halves]`` as one float32 vector (``h = sum(x**2) / 2``)."""
    if not halves:
        return tf.zeros([0], tf.float32)
    return tf.sqrt(2.0 * tf.stack(halves))


def read_value(variable: Any) -> tf.Tensor:
    """The current value of a Keras or TF variable as a tensor."""
    return tf.convert_to_tensor(variable)


def current_graph():
    """The graph ops are being added to (the eager context's outside functions)."""
    return tf.compat.v1.get_default_graph()


def variable_dtype(variable: Any) -> tf.DType:
    """The dtype of a Keras or TF variable (float32 when it has none)."""
    return tf.as_dtype(getattr(variable, "dtype", tf.float32))
