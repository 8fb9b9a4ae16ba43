"""A classifier that learned only the class shares (labels shuffled apart from the inputs).

With x and y permuted separately, the loss fell from 1.47 to the labels'
entropy (1.38) while the weights kept moving, and the run was called healthy.
"""

import numpy as np
import pytest

from tb_stability.analysis import analyze_logdir, report_to_json

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


def _fit(logdir, aligned: bool, optimizer="adam", noise=0.0):
    from instrumentation import StabilityCallback

    data = np.random.default_rng(0)
    x = data.normal(size=(2048, 20)).astype("float32")
    y = np.argmax(x[:, :4] + noise * data.normal(size=(2048, 4)), axis=1)
    if not aligned:
        y = data.permutation(y)  # x and y shuffled separately
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(4)])
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=4, validation_split=0.2, verbose=0,
              callbacks=[StabilityCallback(str(logdir), every=10)])
    report = analyze_logdir(str(logdir))
    return [f for r in report.runs for f in r.findings], report


def test_labels_shuffled_apart_from_the_inputs_are_told(tmp_path):
    findings, report = _fit(tmp_path / "shuffled", aligned=False)
    assert [(f.kind, f.severity) for f in findings] == [("stalled", "warning")], report_to_json(report)
    (f,) = findings
    assert 0.9 <= f.evidence["ratio_to_entropy"] <= 1.1
    assert f.evidence["label_entropy"] == pytest.approx(np.log(4), rel=0.01)
    assert f.evidence["final_val_loss"] >= 0.97 * f.evidence["label_entropy"]
    assert "nothing about the inputs" in f.explanation and "print(x[:5], y[:5])" in f.remedy


@pytest.mark.parametrize("noise, kind", [(0.5, "stalled"), (0.0, "class_imbalance")],
                         ids=["noisy-labels-base-rate", "clean-labels-one-class"])
def test_weights_pulled_to_zero_are_the_cause_not_the_labels(tmp_path, noise, kind):
    """AdamW's weight_decay=50 at 1e-3 takes 5% of every weight each step: the kernels collapse
    and the loss sits at the labels' entropy (on clean labels the predictions collapse to one
    class too) on aligned labels, so neither the labels nor the class balance are to blame."""
    findings, report = _fit(tmp_path / "decay", aligned=True, noise=noise,
                            optimizer=keras.optimizers.AdamW(1e-3, weight_decay=50.0))
    assert [(f.kind, f.severity) for f in findings] == [(kind, "warning")], report_to_json(report)
    (f,) = findings
    assert f.evidence["collapsed_kernels"]
    assert "weight_decay=50 at learning rate 0.001" in f.explanation
    assert "print(x[:5]" not in f.remedy
    snippet = f.remedy.split("optimizer = ", 1)[1].strip()
    assert snippet == "keras.optimizers.AdamW(learning_rate=0.001, weight_decay=0.1)"
    fixed, report = _fit(tmp_path / "fixed", aligned=True, noise=noise,
                         optimizer=eval(snippet, {"keras": keras}))
    assert fixed == [], report_to_json(report)


def test_the_same_model_on_aligned_labels_has_no_finding(tmp_path):
    findings, report = _fit(tmp_path / "aligned", aligned=True)
    assert findings == [], report_to_json(report)


def test_a_validation_set_unlike_the_training_set_is_not_the_base_rate(tmp_path):
    """Arrays sorted by class under validation_split: validation holds a class training barely
    saw, and its loss (far above the labels' entropy) says the split is wrong, not the labels."""
    from instrumentation import StabilityCallback

    data = np.random.default_rng(1)
    y = np.sort(data.integers(0, 4, 2000))
    x = data.normal(size=(2000, 10)).astype("float32")
    x[:, 0] += 0.3 * y  # a weak signal: the training loss ends near the labels' entropy
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(4, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=4, validation_split=0.27, verbose=0,
              callbacks=[StabilityCallback(str(tmp_path), every=10)])
    report = analyze_logdir(str(tmp_path))
    kinds = {f.kind for r in report.runs for f in r.findings}
    assert "overfitting" in kinds and "stalled" not in kinds, report_to_json(report)
