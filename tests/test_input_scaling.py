"""unscaled_inputs judges what the model's first real layer sees, after its own input scaling."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402
from tb_stability.analysis import analyze_logdir  # noqa: E402
from tb_stability.detectors.data import model_view  # noqa: E402
from tb_stability.reader import load_run  # noqa: E402

RNG = np.random.default_rng(7)
RAW = (RNG.standard_normal((128, 4)) * [100.0, 30.0, 5.0, 300.0] + [50.0, -20.0, 0.0, 900.0]
       ).astype("float32")
LABELS = RNG.integers(0, 2, 128)


def _fit(tmp_path, model, x=RAW, y=LABELS):
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0,
              callbacks=[StabilityCallback(str(tmp_path), every=1)])
    (run,) = analyze_logdir(str(tmp_path)).runs
    return run, [f for f in run.findings if f.kind == "unscaled_inputs"]


def _scaling(tmp_path):
    records = load_run(str(tmp_path)).json["stability/run_info"]
    return [i for _, i in records if "input_scaling" in i][-1]["input_scaling"]


def _sequential(*layers):
    return keras.Sequential([keras.Input((4,)), *layers, keras.layers.Dense(8, activation="relu"),
                             keras.layers.Dense(2)])


def test_raw_inputs_are_flagged(tmp_path):
    _, findings = _fit(tmp_path, _sequential())
    (finding,) = findings
    assert "Normalization()" in finding.remedy and finding.layers == []
    assert _scaling(tmp_path)[0]["scaling"] is None


def test_a_normalization_layer_adapted_on_the_training_data_is_not_flagged(tmp_path):
    norm = keras.layers.Normalization(name="norm")
    norm.adapt(RAW)
    _, findings = _fit(tmp_path, _sequential(norm))
    assert findings == []
    (entry,) = _scaling(tmp_path)
    sd = np.sqrt(np.asarray(norm.variance, np.float64).reshape(-1))
    mean = np.asarray(norm.mean, np.float64).reshape(-1)
    assert entry["scaling"]["class"] == "Normalization" and entry["scaling"]["layer"] == "norm"
    np.testing.assert_allclose(entry["scaling"]["affine"]["scale"], 1.0 / sd, rtol=1e-6)
    np.testing.assert_allclose(entry["scaling"]["affine"]["offset"], -mean / sd, rtol=1e-6)


def test_a_normalization_adapted_on_other_data_is_named_with_what_the_model_sees(tmp_path):
    norm = keras.layers.Normalization(name="norm")
    norm.adapt(RNG.standard_normal((256, 4)).astype("float32"))  # not the data fit gets
    _, findings = _fit(tmp_path, _sequential(norm))
    (finding,) = findings
    assert finding.layers == ["norm"] and "(Normalization 'norm')" in finding.explanation
    assert "does not fit the data it is fed" in finding.explanation
    assert "adapt the Normalization layer on the training inputs" in finding.remedy
    seen = (RAW - np.asarray(norm.mean).reshape(-1)) / np.sqrt(np.asarray(norm.variance)
                                                                  .reshape(-1))
    (name, top), = list(finding.evidence["largest_features"].items())[:1]
    j = int(name[2:-1])
    assert top["after_layer"] == "Normalization 'norm'"
    assert top["min_max_extent"] == pytest.approx(np.abs(seen[:, j]).max(), rel=1e-4)


@pytest.mark.parametrize("first,flagged", [
    (lambda: keras.layers.Rescaling(1.0 / 255, name="scale"), False),
    (lambda: keras.layers.BatchNormalization(), False),
    (lambda: keras.layers.Rescaling(1.0, offset=-128.0), True),  # centred, still ~127
], ids=["rescaling_255", "batchnorm_first", "rescaling_that_does_not_scale"])
def test_8_bit_inputs_scaled_inside_the_model(tmp_path, first, flagged):
    pixels = RNG.integers(0, 256, (128, 4)).astype("float32")
    _, findings = _fit(tmp_path, _sequential(first()), x=pixels)
    assert bool(findings) == flagged


def test_an_input_that_also_feeds_a_raw_path_is_judged_raw(tmp_path):
    norm = keras.layers.Normalization()
    norm.adapt(RAW)
    x = keras.Input((4,))
    h = keras.layers.Concatenate()([norm(x), x])  # the raw values reach the Dense layer too
    model = keras.Model(x, keras.layers.Dense(2)(keras.layers.Dense(8, activation="relu")(h)))
    _, findings = _fit(tmp_path, model)
    assert len(findings) == 1 and findings[0].layers == []


def test_features_are_named_by_their_own_input_beside_an_integer_one(tmp_path):
    """Dict inputs sort by key: the integer ``a_ids`` comes first and has no statistics."""
    ids = keras.Input((1,), name="a_ids", dtype="int32")
    feats = keras.Input((4,), name="b_feats")
    norm = keras.layers.Normalization(name="norm")
    norm.adapt(RAW)
    h = keras.layers.Concatenate()([keras.layers.Flatten()(keras.layers.Embedding(5, 2)(ids)),
                                    norm(feats)])
    model = keras.Model({"a_ids": ids, "b_feats": feats}, keras.layers.Dense(2)(h))
    x = {"a_ids": RNG.integers(0, 5, (128, 1)), "b_feats": RAW}
    run, findings = _fit(tmp_path, model, x=x)
    assert findings == []
    names = load_run(str(tmp_path)).inputs["mean"].names
    assert tuple(names) == ("b_feats[0]", "b_feats[1]", "b_feats[2]", "b_feats[3]")
    scaling = {e["key"]: e["scaling"] for e in _scaling(tmp_path)}
    assert scaling["a_ids"] is None and scaling["b_feats"]["layer"] == "norm"


def test_model_view_maps_positions_and_leaves_unknown_features_raw():
    scaling = [{"position": 0, "name": "in0", "key": None, "scaling": None},
               {"position": 1, "name": "in1", "key": None,
                "scaling": {"class": "Rescaling", "layer": "r",
                            "affine": {"scale": [0.5, 2.0], "offset": [1.0, 0.0]}}},
               {"position": 2, "name": "in2", "key": None,
                "scaling": {"class": "BatchNormalization", "layer": "bn", "normalized": True}}]
    names = ["x0[0]", "x1[0]", "x1[1]", "x1[*]", "x2[0]"]
    rows = [np.array([[3.0, 4.0, -1.0, 7.0, 9.0]]) for _ in range(4)]
    mean, std, lo, hi = (r.copy() for r in rows)
    std = np.abs(std)
    lo -= 2.0
    hi += 2.0
    view = model_view(scaling, names, mean, std, lo, hi)
    np.testing.assert_allclose(view.mean[0, :4], [3.0, 3.0, -2.0, 7.0])
    np.testing.assert_allclose(view.std[0, :4], [3.0, 2.0, 2.0, 7.0])
    np.testing.assert_allclose(view.lo[0, :4], [1.0, 2.0, -6.0, 5.0])
    np.testing.assert_allclose(view.hi[0, :4], [5.0, 4.0, 2.0, 9.0])
    assert np.isnan(view.mean[0, 4]) and view.layers == ["", "Rescaling 'r'", "Rescaling 'r'",
                                                        "", "BatchNormalization 'bn'"]


def test_scaling_after_augmentation_layers_counts(tmp_path):
    """The usual image model: augmentation first, then Rescaling(1 / 255)."""
    pixels = RNG.integers(0, 256, (64, 8, 8, 3)).astype("float32")
    model = keras.Sequential([
        keras.Input((8, 8, 3)), keras.layers.RandomFlip("horizontal"),
        keras.layers.RandomRotation(0.1), keras.layers.Rescaling(1.0 / 255, name="to_unit"),
        keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.Flatten(),
        keras.layers.Dense(2)])
    _, findings = _fit(tmp_path, model, x=pixels, y=LABELS[:64])
    assert findings == []
    (entry,) = _scaling(tmp_path)
    assert entry["scaling"]["layer"] == "to_unit"


def test_per_feature_factors_after_a_reshape_are_not_mapped_onto_the_features(tmp_path):
    """A Normalization after Flatten has one factor per flattened value, not per feature."""
    images = (RNG.standard_normal((64, 2, 4)) * 100).astype("float32")
    norm = keras.layers.Normalization(name="flat_norm")
    norm.adapt(images.reshape(64, -1))
    model = keras.Sequential([keras.Input((2, 4)), keras.layers.Flatten(), norm,
                              keras.layers.Dense(2)])
    _, findings = _fit(tmp_path, model, x=images, y=LABELS[:64])
    assert findings == []
    (entry,) = _scaling(tmp_path)
    assert entry["scaling"] == {"layer": "flat_norm", "class": "Normalization", "normalized": True}


def test_a_dict_input_model_is_told_which_input_to_standardise(tmp_path):
    """Features are named by their input; the remedy adapts a Normalization on that input only."""
    inputs = {"age": keras.Input((1,), name="age"), "pixels": keras.Input((3,), name="pixels")}
    hidden = keras.layers.Dense(8, activation="relu")(
        keras.layers.Concatenate()([inputs["age"], inputs["pixels"]]))
    model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    x = {"age": RAW[:, 3:], "pixels": RNG.random((128, 3)).astype("float32")}
    run, (finding,) = _fit(tmp_path, model, x=x)
    assert load_run(str(tmp_path)).inputs["max"].names == (
        "age[0]", "pixels[0]", "pixels[1]", "pixels[2]")
    assert list(finding.evidence["largest_features"])[0] == "age[0]"
    assert "norm.adapt(x_train['age'])" in finding.remedy
    assert "pixels" not in finding.remedy and "keras.Sequential" not in finding.remedy
