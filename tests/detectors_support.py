"""Builders of synthetic `RunData` for the detector tests (no TensorFlow)."""

from __future__ import annotations

import os

import numpy as np

from tb_stability.rundata import Matrix, RunData, Series

HEALTHY_NPZ = os.path.join(os.path.dirname(__file__), "test_detectors_healthy_mlp.npz")
NAMES = (
    "sequential/dense/kernel",
    "sequential/dense/bias",
    "sequential/dense_1/kernel",
    "sequential/dense_1/bias",
    "sequential/dense_2/kernel",
    "sequential/dense_2/bias",
)


def healthy_loss(n=1200, seed=0, steps_per_epoch=25, last_batch_noise=2.0):
    """Noisy decreasing loss with epoch boundaries and a noisier (smaller) last batch."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    base = 0.25 + 0.45 * np.exp(-t / 300.0)
    noise = rng.normal(0.0, 0.08, n)
    last = (t % steps_per_epoch) == steps_per_epoch - 1
    noise[last] *= last_batch_noise
    return np.maximum(base * (1.0 + noise), 1e-3)


def healthy_grad(n=1200, seed=1):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return (0.5 + 1.5 * np.exp(-t / 200.0)) * np.exp(rng.normal(0.0, 0.2, n))


def per_variable(n, every=10, seed=2, scale=None):
    """Per-variable gradient norms: kernels ~1e-1..1, biases smaller."""
    rng = np.random.default_rng(seed)
    steps = np.arange(0, n, every)
    scale = np.array([0.3, 0.05, 0.4, 0.05, 0.6, 0.1]) if scale is None else np.asarray(scale)
    values = scale[None, :] * np.exp(rng.normal(0.0, 0.2, (steps.size, scale.size)))
    return Matrix(steps=steps, names=NAMES, values=values)


def make_run(loss=None, grad=None, nonfinite=None, lr=1e-3, variables=None, name="run", **kw):
    """A per-step instrumented run."""
    steps = {}
    n = len(loss) if loss is not None else len(grad)
    st = np.arange(n, dtype=np.int64)
    if loss is not None:
        steps["loss"] = Series(st, np.asarray(loss, dtype=np.float64))
    if grad is not None:
        steps["grad_norm"] = Series(st, np.asarray(grad, dtype=np.float64))
    steps["nonfinite_grads"] = Series(
        st, np.zeros(n) if nonfinite is None else np.asarray(nonfinite, dtype=np.float64)
    )
    steps["learning_rate"] = Series(st, np.full(n, lr))
    return RunData(name=name, steps=steps, variables=variables or {}, **kw)


def scalar_run(tags: dict, name="train"):
    """An ordinary TensorBoard run: {tag: values}, steps 0..n-1."""
    return RunData(
        name=name,
        scalars={
            t: Series(np.arange(len(v), dtype=np.int64), np.asarray(v, dtype=np.float64))
            for t, v in tags.items()
        },
    )


def kinds(findings, severity=None):
    return sorted(f.kind for f in findings if severity is None or f.severity == severity)
