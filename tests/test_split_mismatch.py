"""A validation set unlike the training set: classes never trained on, a loss that never improved.

Keras' ``validation_split`` takes the last fraction of ``x`` and ``y`` as
given, before any shuffling: arrays sorted by label leave whole classes out
of training and put only them in validation. The training loss falls, the
validation loss rises from the first epoch and its accuracy sits below
guessing. `missing_classes` flags the class the output predicts but never
sees; `generalization` tells this rise apart from memorising. Hand-made
counts and curves first, then a real fit and the same fit with the remedy's
own lines.
"""

import numpy as np
import pytest

from tb_stability.detectors import generalization, missing_classes


@pytest.mark.parametrize("counts, expected", [
    pytest.param([213, 207, 184, 0], [3], id="sorted-split"),
    pytest.param([40, 0, 35, 0, 30], [1, 3], id="two-missing"),
    pytest.param([500, 300, 5, 0], None, id="long-tail-rare-class-present"),
    pytest.param([100, 0], None, id="binary-all-one-class-is-imbalance"),
    pytest.param([0, 0, 90], None, id="one-class-present-is-imbalance"),
    pytest.param([50, 60, 70], None, id="all-present"),
])
def test_missing_classes_against_counts(counts, expected):
    assert missing_classes.missing(counts) == expected


TRAIN_FALLS = [1.33, 1.10, 0.96, 0.89]


@pytest.mark.parametrize("train, val, never", [
    pytest.param(TRAIN_FALLS, [2.7, 4.3, 5.8, 7.0], True, id="rises-from-the-start-above-train"),
    pytest.param(TRAIN_FALLS, [0.9, 1.0, 1.1, 1.2], None, id="rises-but-ends-near-train"),
    pytest.param(TRAIN_FALLS, [3.2, 3.3, 3.35, 3.4], None, id="rises-under-1.2x"),
    pytest.param(TRAIN_FALLS, [2.7, 4.3, 4.1, 7.0], None, id="dips-once: not every evaluation"),
    pytest.param([1.3, 1.29, 1.28, 1.27], [2.7, 4.3, 5.8, 7.0], None, id="train-flat"),
    pytest.param(TRAIN_FALLS[:2], [2.7, 4.3], None, id="two-points"),
    pytest.param(TRAIN_FALLS + [0.8, 0.7], [2.7, 4.3, 5.8, 7.0, 7.5, 8.0], True,
                 id="six-points-minimum-first"),
    pytest.param([1.3, 1.1, 0.9, 0.8, 0.7, 0.6, 0.5], [1.0, 0.8, 0.7, 0.75, 0.85, 0.95, 1.1],
                 False, id="ordinary-overfitting"),
])
def test_never_improved_against_curves(train, val, never):
    got = generalization.overfit(train, val)
    assert (got and got["never_improved"]) == never, got


tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402
from tb_stability.analysis import analyze_logdir, report_to_json  # noqa: E402


def _data():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 500)  # sorted by class, as a dataset often is
    x = rng.normal(size=(2000, 10)).astype("float32")
    x[:, 0] += y
    return x, y


def _fit(logdir, x, y):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(4, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=32, epochs=4, validation_split=0.25, verbose=0,
              callbacks=[StabilityCallback(str(logdir), every=10)])
    return model


def test_a_sorted_validation_split_is_named_and_the_remedy_fixes_it(tmp_path):
    x, y = _data()
    _fit(tmp_path / "sorted", x, y)
    report = analyze_logdir(str(tmp_path / "sorted"))
    findings = {f.kind: f for f in report.runs[0].findings}
    assert set(findings) == {"class_imbalance", "overfitting"}, report_to_json(report)
    missing = findings["class_imbalance"]
    assert missing.evidence["missing_classes"] == ["3"], missing.evidence
    assert "validation_split" in missing.remedy and "Class 3 never appears" in missing.explanation
    never = findings["overfitting"]
    assert never.evidence["never_improved"] is True and never.evidence["classes"] == 4
    assert never.evidence["final_val_accuracy"] < 0.25 == never.evidence["chance_accuracy"]
    assert "never improved" in never.explanation and "below the 25% of guessing" in never.explanation

    # The remedy's lines, run as written (with the fit's own arguments for its "...").
    namespace = {"np": np, "x": x, "y": y}
    lines = [line.strip() for line in missing.remedy.splitlines() if line.startswith("    ")]
    shuffle = [line for line in lines if not line.startswith(("model.", "print("))]
    exec("\n".join(shuffle), namespace)
    _fit(tmp_path / "shuffled", namespace["x"], namespace["y"])
    fixed = analyze_logdir(str(tmp_path / "shuffled"))
    assert fixed.runs[0].findings == [], report_to_json(fixed)
