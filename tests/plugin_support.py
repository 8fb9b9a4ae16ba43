"""Shared helpers of the plugin and browser tests: a real logdir and a TensorBoard process.

The logdir is written with `tb_stability.writer` (real event files, no
TensorFlow). `TensorBoardProcess` runs the real ``tensorboard`` binary of the
venv on a free port and stops it in bounded time.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np

from tb_stability import schema
from tb_stability.writer import StabilityWriter, make_string_tensor_proto
from tensorboard.compat.proto import event_pb2, summary_pb2

HOSTILE_RUN = "<img src=x onerror=alert(1)>"
LAYERS = ("dense/kernel", "dense/bias", "dense_1/kernel", "dense_1/bias", "output/kernel")
ACTIVATIONS = ("dense", "dense_1")
STEPS = 400
SPIKE_STEP = 250


def _steps_block(loss: np.ndarray, grad: np.ndarray, start: int = 0) -> np.ndarray:
    steps = np.arange(start, start + loss.shape[0], dtype=np.float64)
    nonfinite = (~np.isfinite(grad)).astype(np.float64)
    lr = np.full_like(steps, 1e-3)
    return np.stack([steps, loss, grad, nonfinite, lr], axis=1)


def _write_run(run_dir: str, loss: np.ndarray, grad: np.ndarray, nan_origin=None) -> None:
    rng = np.random.default_rng(0)
    with StabilityWriter(run_dir, wall_time=1.0) as writer:
        for start in range(0, loss.shape[0], 50):
            writer.write_steps(_steps_block(loss[start:start + 50], grad[start:start + 50], start))
        for step in range(0, loss.shape[0], 10):
            depth = np.array([1e-4, 1e-4, 1e-2, 1e-2, 1e-1])
            scale = grad[step] if np.isfinite(grad[step]) else np.nan
            writer.write_variables(step, "grad_norm", LAYERS, depth * scale * (1 + 0.1 * rng.random(5)))
            writer.write_variables(step, "update_ratio", LAYERS, np.full(5, 1e-3) * (1 + rng.random(5)))
            writer.write_layers(step, "dead_fraction", ACTIVATIONS, [0.1, 0.2 + step / 1000])
        for epoch in range(loss.shape[0] // 100):
            writer.write_scalar("epoch_loss", epoch, float(np.nanmean(loss[epoch * 100:(epoch + 1) * 100])))
        if nan_origin is not None:
            writer.write_json(schema.TAG_NAN_ORIGIN, nan_origin["step"], nan_origin)


def build_logdir(root: str) -> str:
    """Writes a logdir with a healthy run, a spiky run, a NaN run and a hostile-named run.

    Returns:
      The logdir path.
    """
    rng = np.random.default_rng(42)
    base = 2.0 * np.exp(-np.arange(STEPS) / 150.0) + 0.1 + 0.01 * rng.standard_normal(STEPS)
    grad = 1.0 + 0.05 * rng.standard_normal(STEPS)
    _write_run(os.path.join(root, "healthy"), base.copy(), grad.copy())
    spiky = base.copy()
    spiky[SPIKE_STEP] *= 25.0
    spiky[-1] *= 40.0
    _write_run(os.path.join(root, "spiky"), spiky, grad.copy())
    nan_loss = base.copy()
    nan_grad = grad.copy()
    nan_grad[300:] = np.inf
    nan_loss[301:] = np.nan
    _write_run(
        os.path.join(root, "nan"), nan_loss, nan_grad,
        nan_origin={"step": 300, "kind": "gradient", "variable": "dense/kernel"},
    )
    hostile = base.copy()
    hostile[SPIKE_STEP] *= 25.0
    _write_run(os.path.join(root, HOSTILE_RUN), hostile, grad.copy())
    return root


LATE_STEP = 200
LATE_VARIABLE = "late/kernel"


def write_disconnected_run(root: str, name: str = "disconnected") -> str:
    """A healthy run in which ``unused/kernel`` never gets a gradient (norm exactly 0).

    Its gradient norms also hold `LATE_VARIABLE` from `LATE_STEP` on only (a
    layer unfrozen half-way): the records before do not hold it.
    """
    rng = np.random.default_rng(7)
    loss = 2.0 * np.exp(-np.arange(STEPS) / 150.0) + 0.1 + 0.01 * rng.standard_normal(STEPS)
    grad = 1.0 + 0.05 * rng.standard_normal(STEPS)
    names = LAYERS + ("unused/kernel",)
    with StabilityWriter(os.path.join(root, name), wall_time=1.0) as writer:
        writer.write_steps(_steps_block(loss, grad))
        for step in range(0, STEPS, 10):
            norms = np.array([1e-1, 1e-1, 1e-1, 1e-1, 1e-1, 0.0]) * (1 + 0.1 * rng.random(6))
            if step >= LATE_STEP:  # a layer unfrozen for the second half (fine-tuning)
                writer.write_variables(step, "grad_norm", names + (LATE_VARIABLE,),
                                       np.append(norms, 0.05))
                continue
            writer.write_variables(step, "grad_norm", names, norms)
            ratios = np.full(6, 1e-3) * (1 + rng.random(6))
            ratios[-1] = 0.0
            writer.write_variables(step, "update_ratio", names, ratios)
    return os.path.join(root, name)


ORDINARY_RUN = "plain/train"


def write_ordinary_run(root: str, name: str = ORDINARY_RUN) -> str:
    """A run without instrumentation, tagged as many hand-written loops tag it.

    ``Loss/train`` every step with a spike at `SPIKE_STEP`, ``Loss/test`` every
    10 steps falling then rising (overfitting), ``Accuracy/train`` beside them.
    """
    rng = np.random.default_rng(3)
    loss = 2.0 * np.exp(-np.arange(STEPS) / 150.0) + 0.1 + 0.01 * rng.standard_normal(STEPS)
    loss[SPIKE_STEP] *= 25.0
    with StabilityWriter(os.path.join(root, name), wall_time=1.0) as writer:
        for step in range(STEPS):
            writer.write_scalar("Loss/train", step, float(loss[step]))
            writer.write_scalar("Accuracy/train", step, float(0.5 + step / (2 * STEPS)))
            if step % 10 == 0:
                writer.write_scalar("Loss/test", step, float(1.0 + ((step - 100) / 150.0) ** 2))
    return os.path.join(root, name)


BLOWUP_RUN = "blowup/train"
UNCHECKED_RUN = "pictures"
GAN_RUN = "gan"


def write_blowup_run(root: str, name: str = BLOWUP_RUN) -> str:
    """An ordinary run whose ``loss`` blows up 150x at steps 1-6, then recovers and decays."""
    rng = np.random.default_rng(4)
    loss = 2.0 * np.exp(-np.arange(STEPS) / 80.0) + 0.1 + 0.01 * rng.standard_normal(STEPS)
    loss[1:7] = [120.0, 300.0, 200.0, 60.0, 15.0, 4.0]
    with StabilityWriter(os.path.join(root, name), wall_time=1.0) as writer:
        for step in range(STEPS):
            writer.write_scalar("loss", step, float(loss[step]))
    return os.path.join(root, name)


def write_gan_run(root: str, name: str = GAN_RUN) -> str:
    """A GAN's ``d_loss`` and ``g_loss``: from 1.4 and 0.7 the discriminator's falls to ~0.01
    by step 150 while the generator's climbs to ~8 (the discriminator wins)."""
    rng = np.random.default_rng(5)
    won = 1.0 / (1.0 + np.exp(-(np.arange(STEPS) - 100) / 15.0))
    d_loss = 1.4 * (1 - won) + 0.01 + 0.02 * rng.random(STEPS)
    g_loss = 0.7 + 7.3 * won + 0.1 * rng.random(STEPS)
    with StabilityWriter(os.path.join(root, name), wall_time=1.0) as writer:
        for step in range(STEPS):
            writer.write_scalar("d_loss", step, float(d_loss[step]))
            writer.write_scalar("g_loss", step, float(g_loss[step]))
    return os.path.join(root, name)


def write_unchecked_run(root: str, name: str = UNCHECKED_RUN) -> str:
    """A run holding only a text summary: nothing the findings could check."""
    text = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    value = summary_pb2.Summary.Value(tag="notes", metadata=text,
                                      tensor=make_string_tensor_proto("a picture would go here"))
    with StabilityWriter(os.path.join(root, name), wall_time=1.0) as writer:
        writer.write_event(event_pb2.Event(wall_time=1.0, step=0, summary=summary_pb2.Summary(value=[value])))
    return os.path.join(root, name)


def free_port() -> int:
    """An unused TCP port on localhost."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def tensorboard_binary() -> str:
    """The ``tensorboard`` script next to the running Python."""
    return os.path.join(os.path.dirname(sys.executable), "tensorboard")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _declared_entry_point() -> str:
    """The ``tensorboard_plugins`` entry point line as pyproject.toml declares it."""
    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as handle:
        text = handle.read()
    section = text.split("[project.entry-points.tensorboard_plugins]", 1)[1]
    line = next(l for l in section.splitlines() if l.strip().startswith("stability"))
    name, value = (part.strip().strip('"') for part in line.split("=", 1))
    return f"{name} = {value}"


def plugin_env(scratch: str) -> dict[str, str]:
    """Environment in which the real ``tensorboard`` binary finds this checkout's plugin.

    A minimal ``tb_stability-0.0.dist-info`` holding the entry point declared
    in pyproject.toml is written under ``scratch``; ``scratch`` and the
    repository go first on ``PYTHONPATH``. TensorBoard then discovers the
    plugin through the same entry-point mechanism as after ``pip install``
    (``importlib.metadata`` keeps the first distribution of a name, so an
    installed copy, if any, is shadowed by this checkout).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    info = os.path.join(scratch, "tb_stability-0.0.dist-info")
    os.makedirs(info, exist_ok=True)
    with open(os.path.join(info, "METADATA"), "w", encoding="utf-8") as handle:
        handle.write("Metadata-Version: 2.1\nName: tb-stability\nVersion: 0.0\n")
    with open(os.path.join(info, "entry_points.txt"), "w", encoding="utf-8") as handle:
        handle.write(f"[tensorboard_plugins]\n{_declared_entry_point()}\n")
    paths = [scratch, REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


class TensorBoardProcess:
    """A real ``tensorboard --logdir`` subprocess on a free port.

    Args:
      logdir: The logdir to serve.
      load_fast: ``"false"`` for the Python multiplexer, ``None`` for the default.
      timeout: Seconds to wait for the server to answer.
    """

    def __init__(self, logdir: str, load_fast: str | None = None, timeout: float = 60.0):
        self.port = free_port()
        self.url = f"http://localhost:{self.port}"
        args = [tensorboard_binary(), "--logdir", logdir, "--port", str(self.port), "--host", "localhost"]
        if load_fast is not None:
            args.append(f"--load_fast={load_fast}")
        scratch = os.path.join(os.path.dirname(os.path.abspath(logdir)), f"tb-{self.port}")
        os.makedirs(scratch, exist_ok=True)
        env = plugin_env(scratch)
        self._log = open(os.path.join(scratch, "tensorboard.log"), "wb")
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=scratch
        )
        self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tensorboard exited with {self.proc.returncode}: {self.log_text()}")
            try:
                with urllib.request.urlopen(self.url + "/data/plugins_listing", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"tensorboard did not answer within {timeout}s: {self.log_text()}")

    def get_json(self, route: str):
        """GETs ``route`` and decodes JSON (raises `urllib.error.HTTPError` on 4xx/5xx)."""
        with urllib.request.urlopen(self.url + route, timeout=30) as response:
            return json.loads(response.read().decode("utf-8"))

    def log_text(self) -> str:
        """What the process printed so far (last 4000 characters)."""
        self._log.flush()
        with open(self._log.name, "rb") as handle:
            return handle.read().decode("utf-8", "replace")[-4000:]

    def stop(self) -> None:
        """Terminates the process (kills it after 10 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()

    def __enter__(self) -> "TensorBoardProcess":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
