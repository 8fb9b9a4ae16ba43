"""The compiled model Keras' TensorBoard callback records, read from real fits.

`keras.callbacks.TensorBoard` writes the model's JSON (tag ``keras``), and with
it the optimizer, its settings and the loss. The reader turns it into
`RunData.model_config`, so an ordinary log's remedies name the run's own
optimizer and ``config_mismatch`` checks its output against its loss.
"""

from __future__ import annotations

import numpy as np
import pytest

from tb_stability.analysis import analyze_logdir
from tb_stability.detectors import _remedies
from tb_stability.reader import LogdirReader
from tb_stability.rundata import RunData, Series
from tb_stability.writer import StabilityWriter

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


def _fit(log_dir, model, optimizer, loss, task="classes", epochs=2, lr_logged=True):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 0) if task == "classes" else x.sum(1, keepdims=True)
    model.compile(optimizer, loss)
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, validation_split=0.25,
              callbacks=[keras.callbacks.TensorBoard(str(log_dir))])
    runs = LogdirReader().load_logdir(log_dir).runs
    if not lr_logged:
        del runs["train"].scalars["epoch_learning_rate"]
    return runs


def _mlp(*head):
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), *head])


def test_the_optimizer_loss_and_output_are_read_from_the_train_run(tmp_path):
    runs = _fit(tmp_path, _mlp(keras.layers.Dense(3), keras.layers.Dropout(0.1)),
                keras.optimizers.SGD(0.05, momentum=0.9, clipnorm=2.0),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    config = runs["train"].model_config
    assert config["optimizer"] == "SGD"
    assert config["optimizer_config"]["learning_rate"] == pytest.approx(0.05)
    assert config["optimizer_config"]["momentum"] == pytest.approx(0.9)
    assert {k: config[k] for k in ("loss_name", "from_logits", "output_activation",
                                   "output_units")} == {
        "loss_name": "sparse_categorical_crossentropy", "from_logits": True,
        "output_activation": "linear", "output_units": 3}  # the Dropout after it passes it on
    assert runs["validation"].model_config == {}
    assert all(run.warnings == [] for run in runs.values())
    train = runs["train"]
    assert _remedies.optimizer_call(train, "learning_rate=0.005") == \
        "keras.optimizers.SGD(learning_rate=0.005, momentum=0.9)"
    assert _remedies.configured_clipping(train) == {"clipnorm": 2.0}


@pytest.mark.parametrize("head, loss, mismatch", [
    pytest.param([keras.layers.Dense(3, activation="softmax")],
                 keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 "softmax twice", id="softmax-output-with-from-logits"),
    pytest.param([keras.layers.Dense(3), keras.layers.Activation("softmax")],
                 keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 "softmax twice", id="activation-layer-with-from-logits"),
    pytest.param([keras.layers.Dense(3)], "sparse_categorical_crossentropy",
                 "expects probabilities but gets logits", id="logits-without-from-logits"),
    pytest.param([keras.layers.Dense(3, activation="softmax")], "sparse_categorical_crossentropy",
                 None, id="softmax-with-probabilities-loss"),
    pytest.param([keras.layers.Dense(3)],
                 keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 None, id="logits-with-from-logits"),
])
def test_an_ordinary_log_gets_config_mismatch_from_the_recorded_model(head, loss, mismatch,
                                                                     tmp_path):
    runs = _fit(tmp_path, _mlp(*head), "adam", loss)
    name, config = _remedies.recorded_optimizer(runs["train"])  # compile("adam"): resolved
    assert name == "Adam" and config["learning_rate"] == pytest.approx(1e-3)
    report = {r.run: r for r in analyze_logdir(str(tmp_path)).runs}
    found = [f for f in report["train"].findings if f.kind == "config_mismatch"]
    if mismatch is None:
        assert found == []
    else:
        (finding,) = found
        assert mismatch in finding.explanation and finding.severity == "warning"
    assert [f for f in report["validation"].findings if f.kind == "config_mismatch"] == []


def _two_heads(structure, cls_activation):
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    cls = keras.layers.Dense(3, activation=cls_activation, name="cls")(hidden)
    reg = keras.layers.Dense(1, name="reg")(hidden)
    return keras.Model(inputs, {"cls": cls, "reg": reg} if structure == "dict" else [cls, reg])


@pytest.mark.parametrize("structure", ["dict", "list"])
@pytest.mark.parametrize("cls_activation, mismatch", [("softmax", True), (None, False)],
                         ids=["softmax-head", "logits-head"])
def test_each_output_of_a_two_headed_model_is_checked_against_its_own_loss(
        structure, cls_activation, mismatch, tmp_path):
    """Read from the ordinary log, the outputs match what the instrumentation records."""
    from instrumentation import StabilityCallback
    losses = [keras.losses.SparseCategoricalCrossentropy(from_logits=True), "mse"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    labels = [rng.integers(0, 3, 64), x.sum(1, keepdims=True)]
    if structure == "dict":
        losses, labels = dict(zip(("cls", "reg"), losses)), dict(zip(("cls", "reg"), labels))
    recorded = {}
    for logger in ("keras", "stability"):
        model = _two_heads(structure, cls_activation)
        model.compile("adam", losses)
        log_dir = tmp_path / logger
        callback = (keras.callbacks.TensorBoard(str(log_dir)) if logger == "keras"
                    else StabilityCallback(str(log_dir), every=1))
        model.fit(x, labels, batch_size=32, epochs=1, verbose=0, callbacks=[callback])
        report = analyze_logdir(str(log_dir))
        found = [f for r in report.runs for f in r.findings if f.kind == "config_mismatch"]
        if mismatch:
            (finding,) = found
            assert finding.explanation == ("output 'cls': from_logits=True with a softmax "
                                           "output applies softmax twice.")
        else:
            assert found == []
        runs = LogdirReader().load_logdir(log_dir).runs
        if logger == "keras":
            recorded[logger] = runs["train"].model_config["outputs"]
        else:
            (info,) = [i for _, i in runs["."].json["stability/run_info"] if "outputs" in i]
            recorded[logger] = info["outputs"]
    keys = ("output", "output_activation", "output_units", "loss_name", "from_logits")
    assert [{k: o[k] for k in keys} for o in recorded["keras"]] == \
        [{k: o[k] for k in keys} for o in recorded["stability"]]
    assert [o["output"] for o in recorded["keras"]] == ["cls", "reg"]


def test_a_subclassed_model_records_nothing_and_is_not_guessed_at(tmp_path):
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden, self.out = keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)

        def call(self, x):
            return tf.nn.softmax(self.out(self.hidden(x)))

    runs = _fit(tmp_path, Net(), "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert runs["train"].model_config == {}  # no get_config: the callback writes no model
    assert runs["train"].warnings == []
    assert not [f for r in analyze_logdir(str(tmp_path)).runs for f in r.findings
                if f.kind == "config_mismatch"]


def test_the_learning_rate_comes_from_the_compiled_optimizer_when_no_scalar_has_it(tmp_path):
    runs = _fit(tmp_path, _mlp(keras.layers.Dense(1)), keras.optimizers.RMSprop(0.5), "mse",
                task="values", lr_logged=False)
    train = runs["train"]
    assert "epoch_learning_rate" not in train.scalars
    from tb_stability.detectors import _common

    assert _common.lr_at(train, 1) == pytest.approx(0.5)
    # RMSprop at 0.5: 10x lower is still 50x its default, so the remedy gives the default.
    call = _remedies.lowered_optimizer_call(train, 10.0)
    assert call.startswith("keras.optimizers.RMSprop(learning_rate=0.001)")
    assert "RMSprop's default: 10x lower (0.05)" in call


def _run(lr, optimizer=None):
    model_config = {"optimizer": optimizer, "optimizer_config": {}} if optimizer else {}
    return RunData(name="r", model_config=model_config,
                   scalars={"epoch_learning_rate": Series(np.arange(3), np.full(3, lr))})


@pytest.mark.parametrize("lr, optimizer, factor, expected, noted", [
    pytest.param(1.0, "Adam", 10.0, 1e-3, True, id="adam-1000x-its-default"),
    pytest.param(0.1, "Adam", 10.0, 0.01, False, id="adam-within-its-range-after-the-cut"),
    pytest.param(1.0, "SGD", 10.0, 0.1, False, id="sgd-has-no-such-range"),
    pytest.param(1.0, "Adam", 1.0, 1.0, False, id="a-kept-rate-is-kept"),
    pytest.param(1.0, None, 10.0, 1e-3, True, id="unrecorded-optimizer-is-adam"),
    pytest.param(1.0, "adam", 10.0, 1e-3, True, id="a-name-given-as-a-string"),
])
def test_a_lowered_rate_that_is_still_too_high_for_the_optimizer_becomes_its_default(
        lr, optimizer, factor, expected, noted):
    run = _run(lr, optimizer)
    rate, note = _remedies.lowered_rate_for(run, lr, factor)
    assert rate == pytest.approx(expected)
    assert bool(note) == noted


def test_a_corrupt_model_config_is_a_warning_and_the_rest_loads(tmp_path):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.util.tensor_util import make_tensor_proto

    meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(
        plugin_name="graph_keras_model"))
    with StabilityWriter(tmp_path / "run", wall_time=1.0) as writer:
        writer.write_event(event_pb2.Event(step=0, summary=summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag="keras", metadata=meta,
                                      tensor=make_tensor_proto(b"{not json"))])))
        writer.write_scalar("loss", 0, 1.0)
    run = LogdirReader().load_logdir(tmp_path).runs["run"]
    assert run.model_config == {}
    assert len(run.warnings) == 1 and "could not decode the Keras model config" in run.warnings[0]
    assert list(run.scalars["loss"].values) == [1.0]
