"""The training loss of an ordinary log is found under the names people give it.

Event files are written with the project's writer (tensor scalars, and
TF1-style ``simple_value`` scalars); the plugin's ``/runs`` is read through
TensorBoard's WSGI app.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tb_stability.analysis import analyze_logdir, report_to_json
from tb_stability.detectors import _loss_tags
from tb_stability.reader import load_logdir
from tb_stability.writer import StabilityWriter
from tests import plugin_support

STEPS = 600
SPIKE = 300


def _curve(seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(STEPS)
    return 2.0 * np.exp(-t / 200) + 0.3 + 0.02 * rng.standard_normal(STEPS)


def _write(run_dir, series: dict, legacy=False, every: dict | None = None):
    every = every or {}
    with StabilityWriter(str(run_dir), wall_time=1.0) as writer:
        write = writer.write_legacy_scalar if legacy else writer.write_scalar
        for tag, values in series.items():
            for step in range(0, len(values), every.get(tag, 1)):
                write(tag, step, float(values[step]))


def _findings(report, kind=None):
    return [(r.run, f) for r in report.runs for f in r.findings if kind in (None, f.kind)]


@pytest.mark.parametrize("tag,loss,held_out,part", [
    ("loss", True, False, False),
    ("Loss/train", True, False, False),
    ("Loss/test", True, True, False),
    ("train_loss_step", True, False, False),
    ("val_loss", True, True, False),
    ("trainLoss", True, False, False),
    ("valLoss", True, True, False),
    ("Loss/total_loss", True, False, False),
    ("Loss/classification_loss", True, False, True),
    ("NLLLoss", True, False, True),
    ("losses/total_loss", True, False, False),
    ("eval/loss", True, True, False),
    ("Accuracy/train", False, False, False),
    ("lossless_ratio", False, False, False),
    ("latest/loss", True, False, False),
    ("loss/ce", True, False, True),
    ("losses/kl", False, False, True),
    ("loss/total", True, False, False),
    ("loss/train", True, False, False),
    ("Loss/Validation", True, True, False),
], ids=lambda v: v if isinstance(v, str) else None)
def test_tag_words(tag, loss, held_out, part):
    assert _loss_tags.is_loss(tag) is loss
    assert _loss_tags.is_held_out(tag) is held_out
    assert _loss_tags.is_part(tag) is part


@pytest.mark.parametrize("legacy", [False, True], ids=["tensor", "simple_value"])
@pytest.mark.parametrize("tag", ["Loss/train", "loss/train", "Train/Loss", "train_loss_step",
                                 "loss_epoch", "Loss/total_loss", "trainLoss"])
def test_spike_found_under_any_loss_name(tmp_path, tag, legacy):
    loss = _curve()
    loss[SPIKE] *= 8
    _write(tmp_path / "run", {tag: loss, "Accuracy/train": np.linspace(0.5, 0.9, STEPS)},
           legacy=legacy)
    report = analyze_logdir(str(tmp_path))
    spikes = _findings(report, "loss_spike")
    assert len(spikes) == 1, report_to_json(report)
    assert spikes[0][1].first_step == SPIKE
    assert spikes[0][1].evidence["source"] == f"scalar:{tag}"


def test_whole_loss_per_step_is_read_before_parts_and_epoch_means(tmp_path):
    total = _curve()
    total[SPIKE] *= 8
    part = _curve(1)  # a part of the loss without the spike
    epoch = np.repeat([total[i:i + 100].mean() for i in range(0, STEPS, 100)], 100)
    _write(tmp_path / "det", {"Loss/classification_loss": part, "Loss/localization_loss": part,
                              "Loss/total_loss": total})
    _write(tmp_path / "lightning", {"train_loss_epoch": epoch, "train_loss_step": total},
           every={"train_loss_epoch": 100})
    _write(tmp_path / "grouped", {"loss/ce": part, "loss/l2": part, "loss/total": total})
    report = analyze_logdir(str(tmp_path))
    sources = {run: f.evidence["source"] for run, f in _findings(report, "loss_spike")}
    assert sources == {"det": "scalar:Loss/total_loss", "lightning": "scalar:train_loss_step",
                       "grouped": "scalar:loss/total"}


def _overfit_curves(points=60):
    t = np.arange(points)
    return 2.0 * np.exp(-t / 15) + 0.05, 1.0 + 0.002 * (t - 20) ** 2


@pytest.mark.parametrize("train_tag,val_tag", [
    ("Loss/train", "Loss/test"), ("loss/train", "loss/val"), ("trainLoss", "valLoss"),
    ("Loss/Train", "Loss/Validation"),
])
def test_overfitting_within_a_run(tmp_path, train_tag, val_tag):
    train, val = _overfit_curves()
    _write(tmp_path / "run", {train_tag: train, val_tag: val, "Loss/other_test": train})
    found = _findings(analyze_logdir(str(tmp_path)), "overfitting")
    assert len(found) == 1
    assert (found[0][1].evidence["train_tag"], found[0][1].evidence["val_tag"]) == (train_tag, val_tag)


def test_overfitting_pairs_the_epoch_loss_that_shares_the_validation_steps(tmp_path):
    # Lightning-like: the per-step loss is logged at other steps than the
    # per-epoch ones, which share theirs with val_loss.
    train, val = _overfit_curves()
    steps = np.arange(train.size) * 50 + 49
    with StabilityWriter(str(tmp_path / "run"), wall_time=1.0) as writer:
        for i, step in enumerate(steps):
            writer.write_scalar("train_loss_epoch", int(step), float(train[i]))
            writer.write_scalar("val_loss", int(step), float(val[i]))
            for k in range(5):
                writer.write_scalar("train_loss_step", int(step) - 45 + 10 * k, float(train[i]))
    found = _findings(analyze_logdir(str(tmp_path)), "overfitting")
    assert [f.evidence["train_tag"] for _, f in found] == ["train_loss_epoch"]
    assert found[0][1].evidence["best_step"] == int(steps[20])


@pytest.mark.parametrize("train_name,held_name", [("train", "val"), ("train", "test"),
                                                   ("training", "validation"), ("Train", "Val")])
def test_sibling_held_out_run_is_paired_not_read_as_training(tmp_path, train_name, held_name):
    train, val = _overfit_curves()
    _write(tmp_path / "exp" / train_name, {"loss": train})
    _write(tmp_path / "exp" / held_name, {"loss": val})
    report = analyze_logdir(str(tmp_path))
    found = _findings(report)
    assert [(run, f.kind) for run, f in found] == [(f"exp/{held_name}", "overfitting")], (
        report_to_json(report))
    assert found[0][1].evidence["train_run"] == f"exp/{train_name}"
    runs = load_logdir(str(tmp_path)).runs
    assert [name for name, run in runs.items() if run.held_out] == [f"exp/{held_name}"]


def test_a_run_named_test_without_a_training_sibling_is_a_training_run(tmp_path):
    _, rising = _overfit_curves()
    _write(tmp_path / "test", {"loss": rising})
    _write(tmp_path / "other", {"loss": _curve()})
    report = analyze_logdir(str(tmp_path))
    assert [(run, f.kind) for run, f in _findings(report)] == [("test", "divergence")]


def test_runs_route_names_the_loss_the_detectors_read(tmp_path):
    from tests.test_plugin import get_json, make_client  # pylint: disable=import-outside-toplevel

    logdir = plugin_support.build_logdir(str(tmp_path / "logs"))
    plugin_support.write_ordinary_run(logdir)
    train, val = _overfit_curves()
    _write(os.path.join(logdir, "keras", "train"), {"epoch_loss": train})
    _write(os.path.join(logdir, "keras", "validation"), {"epoch_loss": val})
    runs = {r["run"]: r for r in get_json(make_client(logdir), "/runs")["runs"]}
    assert {name: run["loss"] for name, run in runs.items() if name != plugin_support.HOSTILE_RUN} == {
        "healthy": {"source": "steps", "tag": "loss"},
        "spiky": {"source": "steps", "tag": "loss"},
        "nan": {"source": "steps", "tag": "loss"},
        plugin_support.ORDINARY_RUN: {"source": "scalars", "tag": "Loss/train"},
        "keras/train": {"source": "scalars", "tag": "epoch_loss"},
        "keras/validation": None,
    }
    report = analyze_logdir(logdir)
    kinds = {(run, f.kind) for run, f in _findings(report)}
    assert {(plugin_support.ORDINARY_RUN, "loss_spike"), (plugin_support.ORDINARY_RUN, "overfitting"),
            ("keras/validation", "overfitting")} <= kinds


def _exploding(seed=0, points=400, onset=250):
    rng = np.random.default_rng(seed)
    loss = 2.0 * np.exp(-np.arange(points) / 100) + 0.3 + 0.02 * rng.standard_normal(points)
    grad = 1.0 + 0.05 * rng.standard_normal(points)
    grad[onset:] *= np.exp(np.arange(points - onset) / 20)
    loss[onset + 10:] *= np.exp(np.arange(points - onset - 10) / 40)
    return loss, grad


@pytest.mark.parametrize("loss_tag,grad_tag", [
    ("train/loss", "train/grad_norm"), ("loss", "grad_norm"), ("loss", "gradients/global_norm"),
    ("Loss/train", "Gradient/norm"),
])
def test_an_ordinary_global_gradient_norm_is_read(tmp_path, loss_tag, grad_tag):
    loss, grad = _exploding()
    _write(tmp_path / "run", {loss_tag: loss, grad_tag: grad, "grad_norm/dense_1": grad / 10})
    report = analyze_logdir(str(tmp_path))
    exploding = _findings(report, "exploding_gradients")
    assert len(exploding) == 1, report_to_json(report)
    assert exploding[0][1].evidence["signal"] == f"scalar:{grad_tag}"
    assert "clipnorm=2" in exploding[0][1].remedy  # 2x the early norm (~1)


def test_a_per_layer_gradient_norm_is_not_read_as_the_global_one(tmp_path):
    loss, grad = _exploding()
    _write(tmp_path / "run", {"loss": loss, "grad_norm/dense_1": grad, "dense/grad_norm_max": grad})
    report = analyze_logdir(str(tmp_path))
    assert _findings(report, "exploding_gradients") == []
    assert [f.kind for _, f in _findings(report)] == ["divergence"]


def test_a_loss_spike_names_the_gradient_norm_of_an_ordinary_log(tmp_path):
    loss, grad = _curve(), 1.0 + 0.05 * np.random.default_rng(1).standard_normal(STEPS)
    loss[SPIKE] *= 10
    grad[SPIKE] *= 30
    _write(tmp_path / "run", {"loss": loss, "grad_norm": grad})
    (_, spike), = _findings(analyze_logdir(str(tmp_path)), "loss_spike")
    assert spike.evidence["spikes"][0]["grad_norm"] == pytest.approx(grad[SPIKE])
    assert "The gradient norm also jumped" in spike.remedy and "clipnorm=2" in spike.remedy


@pytest.mark.parametrize("lr_tag", ["learning_rate", "lr", "train/lr", "lr-Adam", "LearningRate",
                                    "optimizer/lr", "lr/group0", "epoch_learning_rate"])
def test_the_learning_rate_of_an_ordinary_log_sets_the_remedy(tmp_path, lr_tag):
    loss, grad = _exploding()
    _write(tmp_path / "run", {"loss": loss, "grad_norm": grad, lr_tag: np.full(len(loss), 0.3),
                              "lr_scale": np.full(len(loss), 7.0)})
    (_, divergence), = _findings(analyze_logdir(str(tmp_path)), "divergence")
    assert divergence.evidence["learning_rate"] == pytest.approx(0.3)
    assert "learning_rate=0.03" in divergence.remedy  # 10x lower than the logged rate


@pytest.mark.parametrize("tag", ["lr_scale", "lr_decay_steps", "learning_rate_warmup_steps",
                                 "clr", "lr_finder/loss", "Loss/train"])
def test_tags_that_are_not_the_learning_rate(tag):
    from tb_stability.rundata import RunData, Series

    run = RunData(name="r", scalars={tag: Series(np.arange(3), np.ones(3))})
    assert _loss_tags.learning_rate_tag(run) is None


@pytest.mark.parametrize("hparams, expected", [
    pytest.param({"learning_rate": 0.02, "units": 64.0}, 0.02, id="learning_rate"),
    pytest.param({"lr": 3e-4, "dropout": 0.1}, 3e-4, id="lr"),
    pytest.param({"optimizer/lr": 0.1, "lr_decay": 0.5}, 0.1, id="path-and-not-decay"),
    pytest.param({"lr": 0.5, "learning_rate": 0.01}, 0.01, id="plain-name-first"),
    pytest.param({"lr_scale": 2.0, "lr_warmup": 100.0}, None, id="only-modifiers"),
    pytest.param({"learning_rate": "1e-3"}, None, id="a-string-is-not-read"),
    pytest.param({"learning_rate": True}, None, id="a-bool-is-not-a-rate"),
    pytest.param({"learning_rate": 0.0}, None, id="zero"),
])
def test_the_learning_rate_among_hparams(hparams, expected):
    from tb_stability.rundata import RunData

    assert _loss_tags.learning_rate_hparam(RunData(name="r", hparams=hparams)) == expected


def test_a_logged_learning_rate_comes_before_the_hparam():
    from tb_stability.detectors import _common, _remedies
    from tb_stability.rundata import RunData, Series

    run = RunData(name="r", hparams={"learning_rate": 0.1, "optimizer": "SGD", "momentum": 0.9},
                  scalars={"lr": Series(np.arange(3), np.array([0.3, 0.2, 0.05]))})
    assert _common.lr_at(run, 1) == 0.2
    del run.scalars["lr"]
    assert _common.lr_at(run, 1) == 0.1
    assert _remedies.optimizer_call(run, "learning_rate=0.01") == \
        "keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)"
    run.hparams["optimizer"] = "my_custom_opt"
    assert _remedies.recorded_optimizer(run) == ("Adam", {})
