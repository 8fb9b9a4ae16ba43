"""Smoke test of the benchmarks: each script runs with ``--quick`` and prints its table.

No timing assertions (numbers on a shared CI machine are noise); only that each
script runs end to end on real artefacts and prints a complete ratio table.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str, timeout: int = 300) -> str:
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", script), "--quick", *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_overhead_prints_ratio_table():
    pytest.importorskip("tensorflow")
    out = _run("overhead.py", "--models", "mlp")
    assert "median step ms" in out and "ratio" in out
    for config in ("baseline", "stability defaults", "stability every=1",
                   "tensorboard hist+batch", "tf debug dump"):
        assert f"mlp    {config}" in out, out
    assert "below both peers" in out


def test_overhead_steps_prints_interleaved_ratio_table():
    pytest.importorskip("tensorflow")
    out = _run("overhead_steps.py", "--models", "mlp")
    assert "per-process range" in out and "processes=1" in out
    for config in ("baseline", "baseline again", "stability defaults", "stability every=1",
                   "tensorboard hist+batch"):
        assert f"mlp    {config}" in out, out
    assert "below the TensorBoard callback" in out


def test_overhead_loop_prints_the_custom_loop_table_and_the_monitor_wrote_its_runs(tmp_path):
    pytest.importorskip("tensorflow")
    out = _run("overhead_loop.py", "--models", "mlp")
    assert "per-process range" in out and "processes=1" in out
    for config in ("baseline", "baseline again", "monitor defaults", "monitor no probes",
                   "monitor every=1", "tf.summary hist every step"):
        assert f"mlp    {config}" in out, out
    assert "below hand-written tf.summary histograms" in out


def test_overhead_loop_steps_the_readme_custom_loop(tmp_path):
    """The every=1 configuration records probes, batch statistics and per-step rows."""
    pytest.importorskip("tensorflow")
    from benchmarks import overhead, overhead_loop
    from tb_stability.reader import load_logdir

    x, y = overhead._data("mlp", 24)
    loop = overhead_loop._CustomLoop("mlp", "monitor every=1", x, y, 8, str(tmp_path))
    for _ in range(3):
        assert loop.run_step() > 0
    loop.close()
    (run,) = load_logdir(tmp_path).runs.values()
    assert run.steps["loss"].steps.tolist() == [0, 1, 2]
    assert run.layers and run.inputs and run.labels


def test_versus_compares_a_revision_with_the_tree_in_rotated_processes():
    pytest.importorskip("tensorflow")
    out = _run("versus.py", "--rev", "HEAD", "--models", "mlp", "--processes", "2")
    assert "rev: HEAD  processes=2" in out and "per process" in out
    for config in ("baseline", "baseline again", "rev defaults", "tree defaults",
                   "rev every=1", "tree every=1"):
        line = next(line for line in out.splitlines() if line.startswith(f"mlp    {config}"))
        assert len(line.split()[-2:]) == 2, line  # one ratio per process


def test_reader_prints_throughput_table(tmp_path):
    out = _run("reader.py", "--cache", str(tmp_path), "--loaders",
               "tb_stability load_logdir", "EventAccumulator (no TF)")
    assert "events/s" in out and "time vs tb_stability" in out
    assert "tb_stability load_logdir" in out and "EventAccumulator (no TF)" in out
    rows = [line for line in out.splitlines()
            if line.startswith("quick ") and not line.startswith("quick 2x500x10:")]
    assert len(rows) == 2, out
    assert (tmp_path / "r2_s500_v10_e50" / "MANIFEST.json").exists()


def test_serving_prints_route_and_cli_tables(tmp_path):
    out = _run("serving.py", "--cache", str(tmp_path))
    for route in ("/findings", "/runs", "/series", "/matrix"):
        line = next(l for l in out.splitlines() if l.startswith(route + " "))
        assert line.split()[1] == "200", line
    assert "tb-stability --help" in out
    report = next(l for l in out.splitlines() if l.startswith("tb-stability report"))
    assert " no " in report and "2 runs" in report, report


def test_overhead_steps_switch_sets_a_constant_only_while_its_own_model_traces(tmp_path):
    # The switched CNN traces with LARGE_EXAMPLE raised, so its convolutions
    # write rows centred on their mean (a non-zero centre column); the other
    # model, traced in between, keeps raw sums (centre 0).
    pytest.importorskip("tensorflow")
    from benchmarks import overhead_steps
    from benchmarks.overhead import _data
    from instrumentation import probe_state
    from instrumentation.probe_state import CENTER

    switch = "instrumentation.probe_state.LARGE_EXAMPLE=1000000000"
    configs = overhead_steps.switched_configs(["baseline", "stability every=1"], switch)
    assert configs == ["baseline", "stability every=1", f"stability every=1 [{switch}]"]
    x, y = _data("cnn", 16)
    loops = [overhead_steps._Loop("cnn", c, x, y, 8, str(tmp_path), switch) for c in configs[1:]]
    centres = []
    for loop in reversed(loops):  # the switched model traces first
        loop.run_step()
        table = next(iter(loop.callbacks.callbacks[0]._extras.probes._tables.values()))
        conv = next(i for i, p in enumerate(table.probes) if p.name.startswith("conv2d"))
        centres.append(float(table.rows.numpy()[0, conv, CENTER]))
        loop.close()
    assert probe_state.LARGE_EXAMPLE == 2048
    switched, plain = centres
    assert switched > 0 and plain == 0
    with pytest.raises(ValueError, match="MODULE.NAME=VALUE"):
        overhead_steps.parse_switch("LARGE_EXAMPLE")


def test_overhead_steps_jit_compile_measures_the_callback_under_xla(tmp_path):
    # --jit-compile: every model's step is XLA-compiled (Keras' default where a
    # GPU is present), and the callback still records every step's loss there.
    pytest.importorskip("tensorflow")
    from benchmarks import overhead_steps
    from benchmarks.overhead import _data
    from tb_stability.reader import load_logdir

    assert overhead_steps.parse_args(["--jit-compile", "--quick"]).jit_compile
    assert not overhead_steps.parse_args(["--quick"]).jit_compile
    x, y = _data("mlp", 16)
    loop = overhead_steps._Loop("mlp", "stability every=1", x, y, 8, str(tmp_path),
                                jit_compile=True)
    losses = []
    for _ in range(5):
        loop.run_step()
        losses.append(float(loop.logs["loss"]))
    loop.close()
    assert loop.model.jit_compile is True
    (run,) = load_logdir(tmp_path).runs.values()
    recorded = run.steps["loss"]
    assert list(recorded.steps) == [0, 1, 2, 3, 4]
    # Keras' logs["loss"] is the running mean of the raw per-step losses.
    raw = np.asarray(recorded.values, dtype=float)
    np.testing.assert_allclose(np.cumsum(raw) / np.arange(1, 6), losses, rtol=1e-5)
