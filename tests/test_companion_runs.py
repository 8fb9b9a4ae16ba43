"""Keras' TensorBoard callback in the instrumented logdir: each finding is reported once.

``TensorBoard(log_dir)`` and ``StabilityCallback(log_dir)`` on one fit write three
runs: the instrumented ``.`` and Keras' ``train`` and ``validation``. The epoch
scalars of the latter repeat what the instrumented run holds.
"""

from __future__ import annotations

import numpy as np
import pytest

from tb_stability.analysis import analyze_logdir, report_to_json
from tests.test_plugin import get_json, make_client

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402


def _overfit(log_dir, stability=True):
    """A wide MLP memorising 192 examples of random labels: the validation loss rises."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 10)).astype("float32")
    y = rng.integers(0, 2, 256).astype("int32")
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    callbacks = [keras.callbacks.TensorBoard(str(log_dir))]
    if stability:
        callbacks.append(StabilityCallback(str(log_dir)))
    model.fit(x, y, batch_size=32, epochs=30, validation_split=0.25, verbose=0,
              callbacks=callbacks)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    root = tmp_path_factory.mktemp("both")
    _overfit(root / "mlp")
    return root


def test_a_finding_of_the_instrumented_run_is_not_repeated_in_keras_runs(both):
    report = analyze_logdir(both)
    runs = {r.run: r for r in report.runs}
    assert set(runs) == {"mlp", "mlp/train", "mlp/validation"}
    assert "overfitting" in {f.kind for f in runs["mlp"].findings}
    assert "overfitting" not in {f.kind for f in runs["mlp/validation"].findings}
    (note,) = [w for w in runs["mlp/validation"].warnings if "TensorBoard callback" in w]
    assert "'mlp'" in note and "(overfitting)" in note
    # The panel's findings are the same report.
    body = get_json(make_client(str(both)), "/findings")
    assert {r["run"]: [f["kind"] for f in r["findings"]] for r in body["runs"]} == {
        r["run"]: [f["kind"] for f in r["findings"]] for r in report_to_json(report)["runs"]}


def test_keras_runs_keep_their_findings_without_an_instrumented_parent(tmp_path):
    """The same fit with Keras' callback alone: the pair's overfitting stays with its runs."""
    _overfit(tmp_path / "mlp", stability=False)
    report = analyze_logdir(tmp_path)
    runs = {r.run: r for r in report.runs}
    assert set(runs) == {"mlp/train", "mlp/validation"}
    assert "overfitting" in {f.kind for f in runs["mlp/validation"].findings}
    assert not any("TensorBoard callback" in w for r in report.runs for w in r.warnings)
