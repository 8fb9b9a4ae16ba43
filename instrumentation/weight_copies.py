"""Room for pre-update weights: a few flat variables per dtype instead of one per weight.

Used by the NaN capture (`instrumentation.nan_capture`, the weights before
the first non-finite step) and by the statistics' weight snapshots
(`instrumentation.stats`, the weights before a log step where the step
decides in the graph whether it logs).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import tensorflow as tf


class WeightCopy:
    """Room for the pre-update values of several variables of one dtype, in one variable.

    Every variable the train step touches is one more input of each call of
    the compiled step, about 1.6 µs each on a 2-core CPU (and one more input
    of the branch that writes the copy). Flat variables per dtype (one per
    `CHUNK_BYTES` of weights) instead of one copy per weight keep that cost
    from growing with the number of layers. The copy is written by one assign of the members' concatenation:
    an assign into a slice of a variable copied the whole variable each time
    (14 slices of the 1.6 MB MLP cost 1.6 ms, ten times that with a variable
    ten times as large), so a copy of ``k`` weights cost ``k`` copies of all
    of them. `weight_copies` keeps each flat variable under `CHUNK_BYTES`,
    which bounds the concatenation's temporary. A weight whose shape is not
    fully known gets a variable of its own.

    Args:
      members: ``(index, variable)`` pairs, all of one dtype; several only
        when every shape is fully defined.
      make_variable: ``f(initial_value, shape)`` creating the variable
        (default: a non-trainable ``tf.Variable`` named ``name``).
      name: The default variable's name.
    """

    def __init__(self, members: Sequence[tuple], make_variable: Optional[Callable] = None,
                 name: str = "stability_weight_copy"):
        if make_variable is None:
            def make_variable(initial_value, shape):
                return tf.Variable(initial_value, shape=shape, trainable=False, name=name)
        self.members = []  # (index, start, stop, shape)
        dtype = tf.as_dtype(members[0][1].dtype)
        shapes = [tf.TensorShape(variable.shape) for _, variable in members]
        if len(members) == 1 and not shapes[0].is_fully_defined():
            self.flat = False
            self.variable = make_variable(tf.zeros([0] * (shapes[0].rank or 0), dtype),
                                          shapes[0])
            self.members.append((members[0][0], 0, 0, shapes[0]))
            return
        self.flat = True
        start = 0
        for (index, _), shape in zip(members, shapes):
            size = int(np.prod(shape.as_list(), dtype=np.int64))
            self.members.append((index, start, start + size, shape))
            start += size
        self.variable = make_variable(tf.zeros([start], dtype), tf.TensorShape([start]))

    def assign_from(self, sources: Sequence[Any]) -> None:
        """Copies ``sources[index]`` of every member into its slice: one assign (graph side)."""
        values = [tf.convert_to_tensor(sources[index]) for index, _, _, _ in self.members]
        if not self.flat:
            self.variable.assign(values[0])
            return
        parts = [tf.reshape(value, [-1]) for value in values]
        self.variable.assign(parts[0] if len(parts) == 1 else tf.concat(parts, 0))

    def tensors(self) -> list:
        """``(index, tensor)`` of every member, from one read of the variable (graph side)."""
        return self._split(tf.convert_to_tensor(self.variable), tf.reshape)

    def values(self) -> list:
        """``(index, numpy array)`` of every member, in its variable's shape (host side)."""
        return self._split(self.variable.numpy(), np.reshape)

    def _split(self, data, reshape) -> list:
        """``(index, value)`` of every member: its slice of ``data`` in its own shape."""
        if not self.flat:
            return [(self.members[0][0], data)]
        return [(index, reshape(data[start:stop], shape.as_list()))
                for index, start, stop, shape in self.members]


CHUNK_BYTES = 64 << 20
"""Largest flat copy variable (bytes) `weight_copies` fills with several weights."""


def weight_copies(variables: Sequence[Any], make_variable: Optional[Callable] = None,
                  name: str = "stability_weight_copy", chunk_bytes: Optional[int] = None) -> list:
    """`WeightCopy`s for ``variables``: per dtype, weights in order, up to ``chunk_bytes`` each
    (default `CHUNK_BYTES`; a larger weight alone), plus one per weight of unknown shape.

    Args:
      make_variable, name: As for `WeightCopy`.
      chunk_bytes: Bound of a flat copy's size, hence of the temporary that writes it.
    """
    limit = CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    chunks: dict = {}  # dtype -> [[members], ...]; the last one is being filled
    sizes: dict = {}  # dtype -> bytes of the last chunk
    copies = []
    for index, variable in enumerate(variables):
        shape = tf.TensorShape(variable.shape)
        if not shape.is_fully_defined():
            copies.append(WeightCopy([(index, variable)], make_variable, name))
            continue
        dtype = tf.as_dtype(variable.dtype)
        size = int(np.prod(shape.as_list(), dtype=np.int64)) * dtype.size
        lists = chunks.setdefault(dtype, [[]])
        if lists[-1] and sizes[dtype] + size > limit:
            lists.append([])
            sizes[dtype] = 0
        lists[-1].append((index, variable))
        sizes[dtype] = sizes.get(dtype, 0) + size
    return [WeightCopy(members, make_variable, name)
            for lists in chunks.values() for members in lists] + copies


def copied_tensors(copies: Sequence[WeightCopy], count: int) -> list:
    """The ``count`` weights held by ``copies``, as tensors in variable order (graph side)."""
    return _in_variable_order([copy.tensors() for copy in copies], count)


def copied_values(copies: Sequence[WeightCopy], count: int) -> list:
    """The ``count`` weights held by ``copies``, as numpy arrays in variable order (host side)."""
    return _in_variable_order([copy.values() for copy in copies], count)


def _in_variable_order(parts: Sequence[list], count: int) -> list:
    ordered: list = [None] * count
    for pairs in parts:
        for index, value in pairs:
            ordered[index] = value
    return ordered
