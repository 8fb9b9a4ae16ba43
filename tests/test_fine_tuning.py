"""Fine-tuning: one callback over two fits, the second recompiled with layers unfrozen.

The recompile brings a fresh optimizer whose ``iterations`` restart at 0, and
the second fit trains more variables than the first. The log must continue the
run's steps (not overwrite the first fit's), and the variables the first fit
did not train must not read as non-finite.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402
from tb_stability.analysis import analyze_logdir  # noqa: E402
from tb_stability.reader import load_run  # noqa: E402

BATCHES = 16  # per epoch


def _compile(model, lr):
    model.compile(keras.optimizers.Adam(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def test_a_second_fit_after_unfreezing_continues_the_run(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCHES * 32, 16)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 0)
    base = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu", name="dense")],
                            name="base")
    base.trainable = False
    inputs = keras.Input((16,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(base(inputs)))
    _compile(model, 1e-2)
    callback = StabilityCallback(str(tmp_path), every=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the live warnings must not break
        model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[callback])
        base.trainable = True
        _compile(model, 1e-3)
        model.fit(x, y, batch_size=32, epochs=4, initial_epoch=2, verbose=0, callbacks=[callback])

    run = load_run(str(tmp_path))
    assert run.steps["loss"].steps.tolist() == list(range(4 * BATCHES))
    assert np.isfinite(run.steps["loss"].values).all()
    grad = run.variables["grad_norm"]
    assert set(grad.names) == {"head/kernel", "head/bias", "base/dense/kernel", "base/dense/bias"}
    first_fit = grad.steps < 2 * BATCHES
    assert grad.steps[first_fit].tolist() == list(range(0, 2 * BATCHES, 5))
    assert grad.steps[~first_fit].tolist() == list(range(2 * BATCHES, 4 * BATCHES, 5))
    base_columns = [j for j, name in enumerate(grad.names) if name.startswith("base/")]
    assert grad.missing[np.ix_(first_fit, base_columns)].all()
    assert not grad.missing[~first_fit].any()
    assert np.isfinite(grad.values[~first_fit]).all()
    # Epoch scalars keep Keras' epoch numbers.
    assert run.scalars["epoch_loss"].steps.tolist() == [0, 1, 2, 3]
    (report,) = analyze_logdir(str(tmp_path)).runs
    assert "nan_inf" not in {f.kind for f in report.findings}, report.findings
