"""Vanishing gradients whose cause is the weights: a decay far too strong pulls the kernels to zero.

Keras applies ``w -= learning_rate * weight_decay * w`` every step, so
AdamW's ``weight_decay=50`` at ``1e-2`` halves every weight each step; an L2
``kernel_regularizer`` of 10 under SGD at ``1e-2`` takes a fifth. The
gradients through those kernels vanish, and the finding used to advise ReLU
and He initialisation for layers that already had both. Checked on real fits:
the finding names the collapse and the decay, and the remedy's optimizer,
run as written, trains the same model without the finding.
"""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402
from tb_stability.analysis import analyze_logdir, report_to_json  # noqa: E402
from tb_stability.detectors import _weight_collapse  # noqa: E402


def _fit(logdir, optimizer, regularizer=None):
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    x = rng.normal(size=(2048, 10)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")
    model = keras.Sequential([keras.Input((10,))] + [
        keras.layers.Dense(32, activation="relu", kernel_regularizer=regularizer) for _ in range(2)
    ] + [keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer, "binary_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, batch_size=32, epochs=3, verbose=0,
                        callbacks=[StabilityCallback(str(logdir), every=10)])
    report = analyze_logdir(str(logdir))
    return report, history.history["accuracy"][-1]


def _vanishing(report):
    return [f for r in report.runs for f in r.findings if f.kind == "vanishing_gradients"]


def test_adamw_weight_decay_too_strong_is_named_and_its_remedy_trains(tmp_path):
    report, accuracy = _fit(tmp_path / "decay", keras.optimizers.AdamW(1e-2, weight_decay=50.0))
    (finding,) = _vanishing(report)
    collapsed = finding.evidence["collapsed_kernel_norms"]
    assert collapsed and all(v["last"] < _weight_collapse.COLLAPSE * v["first"]
                             for v in collapsed.values())
    assert "collapsed" in finding.explanation and "weight_decay=50 at learning rate 0.01" in finding.explanation
    assert "ReLU" not in finding.remedy and "he_normal" not in finding.remedy
    assert accuracy < 0.6  # it learned nothing

    snippet = finding.remedy.split("optimizer = ", 1)[1].strip()
    assert snippet == "keras.optimizers.AdamW(learning_rate=0.01, weight_decay=0.01)"
    fixed, accuracy = _fit(tmp_path / "fixed", eval(snippet, {"keras": keras}))
    assert _vanishing(fixed) == [], report_to_json(fixed)
    assert accuracy > 0.9


def test_an_l2_penalty_too_strong_is_named_without_a_weight_decay(tmp_path):
    report, _ = _fit(tmp_path / "l2", keras.optimizers.SGD(1e-2), keras.regularizers.L2(10.0))
    (finding,) = _vanishing(report)
    assert finding.evidence["collapsed_kernel_norms"]
    assert "kernel_regularizer" in finding.explanation and "L2(1e-4)" in finding.remedy
