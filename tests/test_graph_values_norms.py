"""`half_sum_squares`: ``L2Loss`` in graphs, a product with ones under XLA on a CPU."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from instrumentation import graph_values  # noqa: E402
from instrumentation.graph_values import half_sum_squares  # noqa: E402

SHAPES = {
    "dense-kernel-256-multiple": (64, 256),
    "conv-kernel-padded": (3, 3, 16, 33),
    "odd-length-padded": (5003,),
    "small-bias-l2loss": (256,),
    "scalar": (),
}


def _reference(values: np.ndarray) -> float:
    return float(np.sum(np.asarray(values, np.float64) ** 2) / 2)


def _ops(fn, *args) -> set:
    return {op.type for op in fn.get_concrete_function(*args).graph.get_operations()}


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("xla", [False, True], ids=["graph", "xla"])
def test_half_sum_squares_matches_numpy(shape, xla):
    values = np.random.default_rng(0).normal(size=shape).astype("float32")
    fn = tf.function(lambda t: half_sum_squares(t, xla=xla), jit_compile=xla)
    got = float(fn(tf.constant(values)))
    assert got == pytest.approx(_reference(values), rel=1e-5)
    ops = _ops(fn, tf.constant(values))
    large = values.size >= 4 * graph_values.XLA_NORM_WIDTH
    # No GPU in these tests: under XLA a large tensor takes the product with ones.
    assert ("MatMul" in ops) == (xla and large)
    assert ("L2Loss" in ops) == (not (xla and large))


def test_half_sum_squares_of_sliced_and_half_precision_gradients_under_xla():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(40, 128)).astype("float16")
    slices = tf.IndexedSlices(tf.constant(values), tf.range(40), tf.constant([100, 128]))
    fn = tf.function(lambda v, i: half_sum_squares(tf.IndexedSlices(v, i), xla=True),
                     jit_compile=True)
    got = float(fn(slices.values, slices.indices))
    assert got == pytest.approx(_reference(values.astype(np.float32)), rel=1e-4)


def test_width_zero_keeps_l2loss_under_xla(monkeypatch):
    monkeypatch.setattr(graph_values, "XLA_NORM_WIDTH", 0)
    values = tf.ones([64, 256])
    fn = tf.function(lambda t: half_sum_squares(t, xla=True), jit_compile=True)
    assert float(fn(values)) == 64 * 256 / 2
    assert "MatMul" not in _ops(fn, values)
