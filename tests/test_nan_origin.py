"""NaN origin: loss, layer and gradient origins; artefacts; ``tb-stability replay``."""

from __future__ import annotations

import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402
from tb_stability import cli  # noqa: E402
from tb_stability.analysis import analyze_logdir  # noqa: E402
from tb_stability.reader import load_run  # noqa: E402


@keras.saving.register_keras_serializable("tb_stability_tests")
class DivideByZero(keras.layers.Layer):
    """Divides by a zero computed from the input (inf/NaN on every batch)."""

    def call(self, x):
        zero = tf.cast(tf.shape(x)[0] - tf.shape(x)[0], x.dtype)
        return x / zero


class SqrtOfZero(keras.layers.Layer):
    """Finite forward (sqrt(0) = 0), infinite derivative: NaN gradients upstream."""

    def call(self, x):
        return tf.sqrt(tf.nn.relu(x) * 0.0)


@keras.saving.register_keras_serializable("tb_stability_tests")
def log_loss_unclipped(y_true, y_pred):
    return -tf.reduce_mean(y_true * tf.math.log(y_pred) + (1 - y_true) * tf.math.log(1 - y_pred))


def _data(n=64):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 4)).astype("float32")
    return x, (x[:, :1] > 0).astype("float32")


def _train(log_dir, model, loss, jit=False, lr=1e-2):
    keras.utils.set_random_seed(0)
    x, y = _data()
    model.compile(keras.optimizers.SGD(lr), loss, jit_compile=jit)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0,
              callbacks=[StabilityCallback(str(log_dir), every=2)])
    run = load_run(str(log_dir))
    records = run.json.get("stability/nan_origin", [])
    findings = [f for r in analyze_logdir(str(log_dir)).runs for f in r.findings if f.kind == "nan_inf"]
    return records, findings


@pytest.fixture(scope="module")
def layer_run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("div")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              DivideByZero(name="divide"), keras.layers.Dense(1)])
    return log_dir, _train(log_dir, model, "mse")


def test_layer_origin_is_named_and_saved(layer_run):
    log_dir, (records, findings) = layer_run
    assert len(records) == 1
    step, origin = records[0]
    assert step == 0 and origin["origin"] == "layer" and origin["layer"] == "divide"
    # The detector lists the non-finite variables; the recorded origin is in its evidence.
    assert findings and findings[0].evidence["origin"]["layer"] == "divide"
    files = set(os.listdir(os.path.join(str(log_dir), "nan_origin")))
    assert {"batch.npz", "nan_origin.json", "model.keras"} <= files
    with np.load(os.path.join(str(log_dir), "nan_origin", "batch.npz")) as data:
        assert data["x_0"].shape == (16, 4)
        assert np.isfinite(data["w_0"]).all()  # weights before the step


def test_replay_prints_the_same_origin(layer_run, capsys):
    log_dir, _ = layer_run
    assert cli.main(["replay", str(log_dir)]) == 0
    out = capsys.readouterr().out
    assert "origin=layer layer=divide" in out and "same as recorded" in out
    model_file = os.path.join(str(log_dir), "nan_origin", "model.keras")
    assert cli.main(["replay", str(log_dir), "--model", model_file]) == 0


def test_replay_without_artifacts_is_a_usage_error(tmp_path, capsys):
    assert cli.main(["replay", str(tmp_path)]) == 2
    assert "nan_origin.json" in capsys.readouterr().err


@pytest.mark.parametrize("jit", [False, True])
def test_log_zero_loss_origin_is_the_loss(jit, tmp_path):
    model = keras.Sequential([keras.Input((4,)),
                              keras.layers.Dense(1, activation="sigmoid",
                                                 kernel_initializer=keras.initializers.Constant(100.0))])
    records, findings = _train(tmp_path, model, log_loss_unclipped, jit=jit)
    assert records[0][1]["origin"] == "loss"
    assert findings and findings[0].evidence["origin"]["origin"] == "loss"
    assert cli.main(["replay", str(tmp_path)]) == 0


def test_gradient_origin_names_the_variables(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="before"),
                              SqrtOfZero(name="sqrt"), keras.layers.Dense(1, name="after")])
    records, _ = _train(tmp_path, model, "mse")
    origin = records[0][1]
    assert origin["origin"] == "gradients"
    assert any("before" in v for v in origin["variables"])
    assert origin["model_file"] is None or os.path.isfile(origin["model_file"])


def test_healthy_run_saves_nothing(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, activation="relu"),
                              keras.layers.Dense(1)])
    records, findings = _train(tmp_path, model, "mse")
    assert records == [] and findings == []
    assert not os.path.exists(os.path.join(str(tmp_path), "nan_origin"))


class _WeightsAfterEachStep(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.after = {}

    def on_train_batch_end(self, batch, logs=None):
        self.after[batch] = [np.array(w.numpy()) for w in self.model.trainable_weights]


class CustomSGD(keras.optimizers.SGD):
    """Not a Keras built-in: log steps keep the pre-update values for |Δw| and the capture."""


@pytest.mark.parametrize(
    "every,bad_step,optimizer",
    [(1, 3, keras.optimizers.SGD), (1, 3, CustomSGD), (2, 4, CustomSGD), (2, 3, CustomSGD)],
    ids=["every1-from-weights", "every1-from-held-values", "log-step-from-held-values",
         "lean-step-from-weights"],
)
def test_captured_weights_are_those_before_the_bad_step(every, bad_step, optimizer, tmp_path):
    """The saved weights equal the model's weights after the step before the bad one.

    Log steps whose |Δw| needs the pre-update values copy those, the other
    steps read the weights themselves (the update waits); both must give the
    pre-update values of the bad step.
    """
    keras.utils.set_random_seed(0)
    x, y = _data(16 * 6)
    x[16 * bad_step + 5, 2] = np.inf
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(optimizer(0.1), "mse")
    recorder = _WeightsAfterEachStep()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False,
              callbacks=[StabilityCallback(str(tmp_path), every=every), recorder])
    step, origin = load_run(str(tmp_path)).json["stability/nan_origin"][0]
    assert step == bad_step and origin["origin"] == "inputs"
    with np.load(os.path.join(str(tmp_path), "nan_origin", "batch.npz")) as data:
        saved = [data[f"w_{i}"] for i in range(len(model.trainable_weights))]
    expected = recorder.after[bad_step - 1]
    assert len(saved) == len(expected) == 4
    for got, want in zip(saved, expected):
        np.testing.assert_array_equal(got, want)
    assert not all(np.array_equal(a, b) for a, b in zip(expected, recorder.after[bad_step - 2]))


def _weight_copy_cases():
    return {
        "one-dtype": [tf.Variable(np.arange(6, dtype="float32").reshape(3, 2)),
                      tf.Variable(np.float32([7.0, 8.0])),
                      tf.Variable(np.ones((2, 2, 2), "float32"))],
        "mixed-dtypes": [tf.Variable(np.float32([1.5, -2.0])),
                         tf.Variable(np.arange(4, dtype="float64")),
                         tf.Variable(np.float32([[3.0]])),
                         tf.Variable(np.int32([5, 6, 7]))],
        "unknown-shape": [tf.Variable(np.float32([1.0, 2.0])),
                          tf.Variable(np.float32([3.0, 4.0, 5.0]), shape=tf.TensorShape(None)),
                          tf.Variable(np.zeros((0, 3), "float32"))],
    }


@pytest.mark.parametrize("case,chunk_bytes,chunked", [
    ("one-dtype", None, 0), ("mixed-dtypes", None, 0), ("unknown-shape", None, 0),
    ("one-dtype", 32, 1),  # 24 + 8 bytes, then 32: two float32 chunks
    ("one-dtype", 16, 2),  # a 24-byte weight alone, then 8 + 32 > 16: 8, then 32
], ids=["one-dtype", "mixed-dtypes", "unknown-shape", "chunks-of-32-bytes",
        "weights-above-the-chunk-size"])
def test_weight_copies_hold_every_weight_in_flat_variables_per_dtype(case, chunk_bytes, chunked):
    from instrumentation.weight_copies import weight_copies

    variables = _weight_copy_cases()[case]
    copies = weight_copies(variables, chunk_bytes=chunk_bytes)
    dtypes = {v.dtype for v in variables if v.shape.is_fully_defined()}
    unknown = sum(not v.shape.is_fully_defined() for v in variables)
    assert len(copies) == len(dtypes) + unknown + chunked

    @tf.function
    def capture(sources):
        for copy in copies:
            copy.assign_from(sources)

    # One whole assign per copy: an assign into a slice copied the whole variable.
    ops = {op.type for op in capture.get_concrete_function(
        [tf.TensorSpec(v.shape, v.dtype) for v in variables]).graph.get_operations()}
    assert "ResourceStridedSliceAssign" not in ops and "AssignVariableOp" in ops

    doubled = [v * 2 for v in variables]
    capture(doubled)
    got = {index: value for copy in copies for index, value in copy.values()}
    assert sorted(got) == list(range(len(variables)))
    for index, want in enumerate(doubled):
        assert got[index].dtype == want.numpy().dtype
        np.testing.assert_array_equal(got[index], want.numpy())


def test_a_fit_adds_one_weight_copy_however_many_layers(tmp_path):
    model = keras.Sequential([keras.Input((4,))] + [keras.layers.Dense(3) for _ in range(5)])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    callback = StabilityCallback(str(tmp_path), every=2)
    x, y = _data(32)
    model.fit(x, y[:, :1].repeat(3, axis=1), batch_size=16, epochs=1, verbose=0,
              callbacks=[callback])
    capture = callback._extras.capture
    assert len(capture.variables) == 10 and len(capture.copies) == 1
    assert capture.copies[0].variable.shape == (sum(int(np.prod(v.shape))
                                                    for v in model.trainable_variables),)


def _fit_with_bad_batch_part(log_dir, part, rows, x=None, model=None, loss="mse"):
    """One epoch of 4 batches of 16, NaN written into ``part`` at ``rows`` of batch 2."""
    keras.utils.set_random_seed(0)
    features, labels = _data()
    x = features if x is None else x
    weights = np.ones(len(labels), "float32")
    target = {"labels": labels, "sample_weights": weights}.get(part)
    for row in rows:
        if part == "inputs":
            x["right"][16 * 2 + row, 1] = np.nan
        else:
            target[16 * 2 + row] = np.nan
    if model is None:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                                  keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(1e-2), loss)
    model.fit(x, labels, sample_weight=weights, batch_size=16, epochs=1, verbose=0,
              shuffle=False, callbacks=[StabilityCallback(str(log_dir), every=2)])
    records = load_run(str(log_dir)).json.get("stability/nan_origin", [])
    findings = [f for r in analyze_logdir(str(log_dir)).runs for f in r.findings
                if f.kind == "nan_inf"]
    return records, findings


@pytest.mark.parametrize(
    "part,rows,named,hidden",
    [("labels", [5], "", None), ("labels", [0, 3, 9], "", None),
     ("sample_weights", [15], "", None), ("inputs", [2, 7], "right", None),
     ("inputs", [4], "right", "relu")],
    ids=["one-label", "three-labels", "sample-weight", "dict-input", "dict-input-relu"],
)
def test_bad_rows_of_the_batch_are_named_and_the_data_is_blamed(part, rows, named, hidden,
                                                                tmp_path):
    """With a ReLU the loss stays finite (it drops the NaN) while the gradients do not."""
    x = None
    model = None
    if part == "inputs":
        left, right = keras.Input((4,), name="left"), keras.Input((4,), name="right")
        joined = keras.layers.Concatenate()([left, right])
        if hidden:
            joined = keras.layers.Dense(8, activation=hidden)(joined)
        model = keras.Model({"left": left, "right": right}, keras.layers.Dense(1)(joined))
        features, _ = _data()
        x = {"left": features, "right": features.copy()}
    records, findings = _fit_with_bad_batch_part(tmp_path, part, rows, x=x, model=model)
    step, origin = records[0]
    assert step == 2 and origin["origin"] == part
    assert origin["nonfinite_rows"] == [{"name": named, "rows": rows, "count": len(rows),
                                         "of": 16, "values": len(rows)}]
    (finding,) = findings
    rows_txt = ", ".join(str(r) for r in rows)
    assert finding.explanation.startswith(
        {"labels": "The labels", "sample_weights": "The sample weights",
         "inputs": "The input batch"}[part] + " of step 2 hold")
    assert f"batch row{'s' if len(rows) > 1 else ''} {rows_txt} of 16" in finding.explanation
    assert "log of 0" not in finding.explanation
    assert {"labels": "labels are NaN", "sample_weights": "sample weight finite",
            "inputs": "where input right holds NaN/Inf"}[part] in finding.remedy
    if hidden:
        # Whether a ReLU maps NaN to 0 (the loss stays finite) depends on the CPU's kernels:
        # it did on the machine this test was written on, it passes NaN on where oneDNN's
        # fused kernels run without AVX-512. The finding must say which it was.
        loss = finding.evidence["loss_at_onset"]
        assert loss is not None
        assert ("The loss stayed finite" in finding.explanation) == bool(np.isfinite(loss))
    assert "Clip gradients" not in finding.remedy and "clipnorm" not in finding.remedy
    if part == "inputs":  # the snippet, run on the data fed to fit, drops exactly the bad rows
        y = np.arange(len(x["left"]), dtype="float32")
        code = "\n".join(line[4:] for line in finding.remedy.splitlines()[1:]
                         if line.startswith("    ") and not line.startswith("    #"))
        scope = {"np": np, "keras": keras, "x": x, "y": y}
        exec(code, scope)
        dropped = sorted(set(range(len(y))) - set(scope["y"].astype(int)))
        assert dropped == [16 * 2 + r for r in rows]
        assert all(np.isfinite(v).all() for v in scope["x"].values())


def test_a_loss_that_masks_missing_labels_does_not_blame_them(tmp_path):
    """NaN labels the loss ignores are not the origin: the layer that overflows is."""

    def masked_mse(y_true, y_pred):
        known = tf.math.is_finite(y_true)
        diff = tf.where(known, y_pred - tf.where(known, y_true, 0.0), 0.0)
        return tf.reduce_mean(tf.square(diff))

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              DivideByZero(name="divide"), keras.layers.Dense(1)])
    records, _ = _fit_with_bad_batch_part(tmp_path, "labels", [1], model=model, loss=masked_mse)
    step, origin = records[0]
    assert step == 0 and origin["origin"] == "layer" and origin["layer"] == "divide"
    assert "nonfinite_rows" not in origin


def test_the_live_warning_names_the_bad_labels(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="instrumentation"):
        _fit_with_bad_batch_part(tmp_path, "labels", [4])
    live = [r.getMessage() for r in caplog.records if "CRITICAL nan_inf" in r.getMessage()]
    assert len(live) == 1
    assert "The labels of step 2 hold NaN/Inf (batch row 4 of 16)" in live[0]
    assert "Drop or impute the examples whose labels" in live[0]
