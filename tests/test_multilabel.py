"""Multi-label outputs have no classes to count.

Sigmoid units (or a binary loss over several units) hold independent yes/no
labels; the arg-max of a multi-hot row is no class. Counting it told a
healthy multi-label model that "class 0 holds 83% of the labels" and that
"class weighting seems to be in place". The writer now takes no class counts
for such an output, and the detectors ignore counts an older writer took.
"""

import numpy as np
import pytest

from tb_stability import schema


@pytest.mark.parametrize("loss, activation, units, expected", [
    ("binary_crossentropy", "sigmoid", 5, True),
    ("binary_crossentropy", "linear", 5, True),  # from_logits=True
    ("binary_focal_crossentropy", "sigmoid", 3, True),
    ("binary_crossentropy", "softmax", 2, False),  # one-hot over two softmax units
    ("binary_crossentropy", "sigmoid", 1, False),
    ("categorical_crossentropy", "softmax", 5, False),
    ("sparse_categorical_crossentropy", "linear", 5, False),
    ("mse", "sigmoid", 4, True),
    ("mse", "linear", 4, False),
    (None, None, None, False),
], ids=["sigmoid-bce", "logits-bce", "focal", "softmax-2", "one-unit", "softmax-cce", "sparse-logits",
        "sigmoid-mse", "regression", "unknown"])
def test_is_multilabel(loss, activation, units, expected):
    assert schema.is_multilabel(loss, activation, units) is expected


tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402
from tb_stability.analysis import analyze_logdir, report_to_json  # noqa: E402
from tb_stability.reader import load_run  # noqa: E402


def _fit(logdir, units, activation, loss, y):
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    x = rng.normal(size=(len(y), 10)).astype("float32")
    x[:, :5] += y[:, :5] if y.shape[1] >= 5 else 0
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(units, activation=activation)])
    model.compile("adam", loss)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0,
              callbacks=[StabilityCallback(str(logdir), every=10)])
    return load_run(str(logdir)), analyze_logdir(str(logdir))


def _multi_hot(n=2048):
    rng = np.random.default_rng(1)
    rates = np.array([0.5, 0.2, 0.07, 0.02, 0.006])  # rare tags: rarely the arg-max
    return (rng.random((n, 5)) < rates).astype("float32")


def test_a_multilabel_fit_records_no_class_counts_and_gets_no_class_finding(tmp_path):
    run, report = _fit(tmp_path / "tags", 5, "sigmoid", "binary_crossentropy", _multi_hot())
    assert run.labels is None and run.predictions is None
    kinds = {f.kind for r in report.runs for f in r.findings}
    assert "class_imbalance" not in kinds, report_to_json(report)


def test_counts_an_older_writer_took_are_ignored(tmp_path, monkeypatch):
    # The writer as it was: arg-max counts of the multi-hot rows.
    monkeypatch.setattr(schema, "is_multilabel", lambda *args: False)
    run, _ = _fit(tmp_path / "old", 5, "sigmoid", "binary_crossentropy", _multi_hot())
    monkeypatch.undo()
    assert run.labels is not None and run.labels.values.shape[1] == 5
    report = analyze_logdir(str(tmp_path / "old"))
    assert not [f for r in report.runs for f in r.findings if f.kind == "class_imbalance"], \
        report_to_json(report)


def test_one_hot_labels_over_two_softmax_units_are_still_counted(tmp_path):
    y = np.eye(2, dtype="float32")[np.random.default_rng(2).integers(0, 2, 1024)]
    run, _ = _fit(tmp_path / "softmax2", 2, "softmax", "binary_crossentropy", y)
    assert run.labels is not None and run.labels.values.shape[1] == 2
    assert run.labels.values.sum() > 0
