"""The examples under examples/ run end to end (each in a subprocess with a timeout)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from tb_stability.reader import load_logdir  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, *args, timeout=180):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", name), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_custom_loop(tmp_path):
    run_example("custom_loop.py", "--logdir", str(tmp_path), "--steps", "12")
    run = load_logdir(tmp_path).runs["."]
    assert run.steps["loss"].steps.tolist() == list(range(12))
    assert np.isfinite(run.steps["grad_norm"].values).all()
    # every=4: the ReLU layer's probes and the batch's inputs and targets at 0, 4, 8.
    assert run.layers["dead_fraction"].names == ("dense",)
    assert run.layers["dead_fraction"].steps.tolist() == [0, 4, 8]
    assert run.inputs["mean"].names == ("x[0]", "x[1]", "x[2]", "x[3]")
    assert run.targets["std"].steps.tolist() == [0, 4, 8]


def test_mirrored_fit_and_custom_loop_agree_and_flag_replica(tmp_path):
    run_example("mirrored.py", "--logdir", str(tmp_path), "--nan-replica", "1")
    runs = load_logdir(tmp_path).runs
    assert set(runs) == {"fit", "custom_loop"}
    for run in runs.values():
        assert run.steps["loss"].steps.tolist() == list(range(6))
        mask = run.steps["nonfinite_replicas"].values
        assert mask[:2].tolist() == [0, 0] and mask[2] == 2  # replica 1 only, at step 2
        assert np.isnan(run.steps["grad_norm"].values[2])
    np.testing.assert_allclose(runs["fit"].steps["grad_norm"].values[:2],
                               runs["custom_loop"].steps["grad_norm"].values[:2], rtol=1e-5)


def test_multi_worker_only_chief_writes(tmp_path):
    run_example("multi_worker.py", "--logdir", str(tmp_path), "--timeout", "150", timeout=200)
    files = [f for f in os.listdir(tmp_path) if "tfevents" in f]
    assert len(files) == 1  # the chief's
    run = load_logdir(tmp_path).runs["."]
    assert run.steps["loss"].steps.tolist() == list(range(4))
    assert np.isfinite(run.steps["grad_norm"].values).all()
    assert (run.steps["nonfinite_replicas"].values == 0).all()


def test_mixed_precision_counts_skipped_steps(tmp_path):
    run_example("mixed_precision.py", "--logdir", str(tmp_path))
    run = load_logdir(tmp_path).runs["."]
    assert run.steps["loss"].steps.tolist() == list(range(12))  # skipped steps kept
    skipped = run.steps["skipped"].values
    scale = run.steps["loss_scale"].values
    assert skipped[0] == 1 and skipped[-1] == 0
    assert (np.diff(scale)[skipped[:-1] == 1] < 0).all()  # halved after each skip
