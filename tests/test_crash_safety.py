"""Crash safety: a killed or failing training process leaves readable event files.

Each test trains a tiny Keras model in a subprocess with `StabilityCallback`
(``every=1000``, so the count-based read never happens during the test): only
the time-based flush policy (`instrumentation.flush_policy`) or the error /
exit paths can put steps on disk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from instrumentation.flush_policy import FLUSH_SECONDS  # noqa: E402
from tb_stability import cli  # noqa: E402
from tb_stability.reader import LogdirReader  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_SECONDS = 0.2
MAX_LOSS_SECONDS = 10.0  # the guarantee documented in docs/guarantees.md

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np, keras
    from instrumentation import StabilityCallback

    log_dir, mode, step_seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])

    class Slow(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step = int(self.model.optimizer.iterations.numpy()) - 1
            print(f"STEP {step} {time.time():.3f}", flush=True)
            if mode == "raise" and step == 30:
                raise RuntimeError("boom at step 30")
            time.sleep(step_seconds)

    rng = np.random.RandomState(0)
    x = rng.randn(64, 4).astype("float32")
    y = x.sum(axis=1, keepdims=True).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    model.fit(x, y, batch_size=4, epochs=1000, verbose=0, shuffle=False,
              callbacks=[StabilityCallback(log_dir, every=1000), Slow()])
    """
)


def _start(tmp_path, mode: str, step_seconds: float = STEP_SECONDS) -> subprocess.Popen:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "logs"), mode, str(step_seconds)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )


def _loaded_steps(logdir) -> np.ndarray:
    run = LogdirReader().load_logdir(logdir).runs["."]
    return run.steps["loss"].steps


def test_sigkill_loses_at_most_the_last_flush_interval(tmp_path):
    process = _start(tmp_path, "slow")
    printed: dict[int, float] = {}
    first = None
    deadline = time.monotonic() + 120
    try:
        for line in process.stdout:
            if not line.startswith("STEP "):
                continue
            _, step, stamp = line.split()
            printed[int(step)] = float(stamp)
            first = first if first is not None else time.monotonic()
            if time.monotonic() - first >= 2 * FLUSH_SECONDS + 2:
                break
            assert time.monotonic() < deadline, "training subprocess too slow"
        assert printed, process.stderr.read()
        process.send_signal(signal.SIGKILL)
        killed_at = time.time()
    finally:
        process.kill()
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    steps = _loaded_steps(tmp_path / "logs")
    assert steps.size, "nothing was flushed before the kill"
    np.testing.assert_array_equal(steps, np.arange(steps.size))  # a gap-free prefix
    last_on_disk = int(steps[-1])
    last_printed = max(printed)
    assert last_on_disk <= last_printed + 1
    lost_seconds = killed_at - printed.get(last_on_disk, killed_at)
    assert lost_seconds <= MAX_LOSS_SECONDS, (last_on_disk, last_printed, lost_seconds)
    # Without the time-based flush nothing would be on disk (every=1000, one
    # writer flush per 1000 steps); with it, more than one flush happened.
    assert last_on_disk >= (2 * FLUSH_SECONDS - 1) / STEP_SECONDS * 0.5

    # The report on the killed run's files works (0 or 1, never 2).
    assert cli.main(["report", str(tmp_path / "logs"), "--format", "json"]) in (0, 1)


def test_exception_in_training_flushes_before_the_process_dies(tmp_path):
    process = _start(tmp_path, "raise", step_seconds=0.0)  # well under FLUSH_SECONDS
    try:
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode != 0
    assert "boom at step 30" in err
    steps = _loaded_steps(tmp_path / "logs")
    # Steps 0..30 ran before the callback raised; all are on disk although
    # `every` (1000) was never reached and fewer than FLUSH_SECONDS passed.
    np.testing.assert_array_equal(steps, np.arange(31))
    assert cli.main(["report", str(tmp_path / "logs")]) in (0, 1)
