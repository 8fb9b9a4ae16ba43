"""Remedies speak of the run's own optimizer and history, from real training runs."""

from __future__ import annotations

import re

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402
from tb_stability.analysis import analyze_logdir  # noqa: E402


def _report(tmp_path, model, x, y, epochs=3):
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0,
              callbacks=[StabilityCallback(str(tmp_path), every=10)])
    (run,) = analyze_logdir(str(tmp_path)).runs
    return run


def test_sgd_with_momentum_that_blows_up_gets_sgd_remedies_with_one_learning_rate(tmp_path):
    """A learning rate cut from SGD's own is an SGD rate: in Adam it would be a disaster."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 16)).astype("float32") * 5
    y = (x @ rng.standard_normal((16, 1))).astype("float32")
    model = keras.Sequential([keras.Input((16,))]
                             + [keras.layers.Dense(64, activation="relu") for _ in range(4)]
                             + [keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse")
    run = _report(tmp_path, model, x, y)
    assert run.warnings == []
    by_kind = {f.kind: f for f in run.findings}
    assert by_kind["nan_inf"].severity == "critical"
    lowered = [by_kind[k] for k in ("nan_inf", "update_ratio_high", "exploding_gradients",
                                    "divergence") if k in by_kind]
    assert len(lowered) >= 2
    rates = set()
    for finding in lowered:
        (call,) = re.findall(r"optimizer = (keras\.optimizers\.\w+\([^)]*\))", finding.remedy)
        assert call.startswith("keras.optimizers.SGD(") and "momentum=0.9" in call, call
        rates.add(re.search(r"learning_rate=([0-9.e+-]+)", call).group(1))
    assert len(rates) == 1, rates  # one lower learning rate per run
    assert float(rates.pop()) <= 0.05 / 10


def test_a_loss_that_is_nan_from_the_first_step_is_blamed_without_a_history(tmp_path):
    """log(0) in a custom loss on the second output of two: NaN from step 0 on."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(1)
    inputs = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu")(inputs)
    reg = keras.layers.Dense(1, name="reg")(h)
    prob = keras.layers.Dense(1, activation="sigmoid", name="p")(h)

    def unclipped_bce(y, p):
        return -keras.ops.mean(y * keras.ops.log(p) + (1 - y) * keras.ops.log(1 - p))

    model = keras.Model(inputs, [reg, prob])
    model.compile(keras.optimizers.Adam(0.05), ["mse", unclipped_bce])
    x = rng.standard_normal((256, 8)).astype("float32") * 20  # saturates the sigmoid at once
    y = [rng.standard_normal((256, 1)).astype("float32"), (x[:, :1] > 0).astype("float32")]
    run = _report(tmp_path, model, x, y, epochs=2)
    assert run.warnings == []  # every detector ran on a loss that was never finite
    (nan,) = [f for f in run.findings if f.kind == "nan_inf"]
    assert nan.first_step == 0
    assert "non-finite from step 0, before any update could have caused it" in nan.explanation
    assert not re.search(r"\bnan", nan.explanation.lower())
    # The custom loss is the second output's: it is named, with the built-in loss on logits.
    assert "The custom loss `unclipped_bce`" in nan.remedy
    assert "drop the sigmoid of p" in nan.remedy and "BinaryCrossentropy(from_logits=True)" in nan.remedy


def test_a_run_that_overflows_within_steps_is_clipped_at_its_level_before_the_blow_up(tmp_path):
    """Two finite steps, the second already 1e4x the first: the clip comes from the first.

    The median of every finite norm before the NaN would be the exploded one,
    a clipnorm that clips nothing.
    """
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 8)).astype("float32") * 20
    y = (x @ rng.standard_normal((8, 1))).astype("float32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "mse")
    run = _report(tmp_path, model, x, y, epochs=1)
    nan = next(f for f in run.findings if f.kind == "nan_inf")
    healthy = nan.evidence["healthy_grad_norm_median"]
    clips = set()
    for finding in run.findings:
        clips.update(float(c) for c in re.findall(r"clipnorm=([0-9.e+-]+)", finding.remedy))
    assert clips, [f.remedy for f in run.findings]
    (clip,) = clips
    assert clip == pytest.approx(2 * healthy, rel=0.05)
    # Every snippet, the dead units' (a consequence of the NaN) included, is the run's SGD.
    assert "dead_units" in {f.kind for f in run.findings}
    calls = [c for f in run.findings for c in re.findall(r"keras\.optimizers\.\w+\([^)]*\)", f.remedy)]
    assert len(calls) >= 3
    assert all(c.startswith("keras.optimizers.SGD(") and "momentum=0.9" in c for c in calls), calls
