"""A later event file that restarts the steps replaces what earlier files logged from there.

Real event files written by `tb_stability.writer`, one writer per training
(as each training opens a new file), read by the reader.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tb_stability import schema
from tb_stability.analysis import analyze_logdir, report_to_json
from tb_stability.reader import file_order, load_run
from tb_stability.writer import StabilityWriter
from tests.test_reader import steps_block


def _training(run_dir, suffix, first, count, loss_offset=0.0, falling=False, spike_at=None,
              epochs=None):
    """One training's file: steps rows, a vector every 10 steps, its run_info, epoch values.

    The loss is ``step / 100 + loss_offset``, or with ``falling`` a noisy
    decaying curve (times 50 at ``spike_at``).
    """
    block = steps_block(first, count, loss_offset)
    if falling:
        rng = np.random.default_rng(len(suffix) + first)
        t = np.arange(count)
        block[:, 1] = 2.0 * np.exp(-t / 80) + 0.2 + 0.01 * rng.standard_normal(count) + loss_offset
    if spike_at is not None:
        block[spike_at - first, 1] *= 50
    with StabilityWriter(run_dir, filename_suffix=suffix) as writer:
        writer.write_json(schema.TAG_RUN_INFO, first, {"fit": suffix})
        writer.write_steps(block)
        for step in range(first, first + count, 10):
            writer.write_variables(step, "grad_norm", ("w",), [float(step) + loss_offset])
        for epoch in epochs or ():
            writer.write_scalar("epoch_loss", epoch, float(epoch) + loss_offset)


@pytest.mark.parametrize("second_first,expected_steps,warned", [
    (0, range(0, 100), True),       # rerun from scratch into the same directory
    (150, range(0, 250), True),     # resumed from a checkpoint at step 150
    (200, range(0, 300), False),    # continued: nothing replaced
], ids=["rerun", "resume", "continue"])
def test_later_training_replaces_from_its_first_step(tmp_path, second_first, expected_steps, warned):
    _training(tmp_path, ".1", 0, 200)
    _training(tmp_path, ".2", second_first, 100, loss_offset=10.0)
    run = load_run(tmp_path)
    loss = run.steps["loss"]
    assert loss.steps.tolist() == list(expected_steps)
    later = np.asarray(expected_steps) >= second_first
    np.testing.assert_allclose(loss.values, np.asarray(expected_steps) / 100 + np.where(later, 10.0, 0.0))
    grad = run.variables["grad_norm"]
    assert grad.steps.tolist() == [s for s in expected_steps if (s - (second_first if s >= second_first else 0)) % 10 == 0]
    assert [info["fit"] for _, info in run.json[schema.TAG_RUN_INFO]] == (
        [".2"] if second_first == 0 else [".1", ".2"])
    restarts = [w for w in run.warnings if "left out" in w]
    if not warned:
        assert restarts == []
        return
    assert len(restarts) == 1
    replaced = 200 - second_first
    # steps rows, vectors (every 10 steps) and run_info records of the first file
    count = replaced + replaced // 10 + (1 if second_first == 0 else 0)
    assert restarts[0].startswith(f"events.out.tfevents.") and ".1: " in restarts[0]
    assert f"{count} point(s) from step {second_first} on were left out" in restarts[0]
    assert ".2 logs the same quantities" in restarts[0]


def test_each_quantity_restarts_on_its_own(tmp_path):
    # Keras' TensorBoard callback restarts its batch counter at every fit while
    # the epochs go on (fit(initial_epoch=3)): the epochs are all kept.
    with StabilityWriter(tmp_path, filename_suffix=".1") as writer:
        for step in range(1, 31):
            writer.write_scalar("batch_loss", step, 1.0)
        for epoch in range(3):
            writer.write_scalar("epoch_loss", epoch, 1.0)
    with StabilityWriter(tmp_path, filename_suffix=".2") as writer:
        for step in range(1, 21):
            writer.write_scalar("batch_loss", step, 2.0)
        for epoch in range(3, 5):
            writer.write_scalar("epoch_loss", epoch, 2.0)
    run = load_run(tmp_path)
    assert run.scalars["batch_loss"].steps.tolist() == list(range(1, 21))
    assert set(run.scalars["batch_loss"].values.tolist()) == {2.0}
    assert run.scalars["epoch_loss"].steps.tolist() == [0, 1, 2, 3, 4]
    assert [w for w in run.warnings if "30 point(s) from step 1 on were left out" in w]


def test_a_rerun_is_not_read_as_a_spike_or_a_divergence(tmp_path):
    # The first training spiked and ran longer; the rerun is healthy. Reading
    # their splice, the rerun's end would be followed by the first one's tail.
    _training(tmp_path / "run", ".1", 0, 400, loss_offset=0.5, falling=True, spike_at=300)
    _training(tmp_path / "run", ".2", 0, 200, falling=True)
    report = analyze_logdir(str(tmp_path))
    assert [f.kind for r in report.runs for f in r.findings] == [], report_to_json(report)
    assert any("left out" in w for r in report.runs for w in r.warnings)


def test_within_one_file_the_last_write_of_a_step_wins(tmp_path):
    with StabilityWriter(tmp_path) as writer:
        writer.write_steps(steps_block(50, 50))
        writer.write_steps(steps_block(0, 60, loss_offset=1.0))  # out of order, one file
    run = load_run(tmp_path)
    assert run.steps["loss"].steps.tolist() == list(range(100))
    assert not [w for w in run.warnings if "left out" in w]


def test_files_are_read_in_the_order_they_were_written(tmp_path):
    # A process's ninth and tenth file of one second: by name ".10" sorts first.
    _training(tmp_path / "a", "", 0, 100)
    _training(tmp_path / "b", "", 0, 50, loss_offset=10.0)
    for source, target in (("a", "events.out.tfevents.1700000000.host.42.9.v2"),
                           ("b", "events.out.tfevents.1700000000.host.42.10.v2")):
        (name,) = os.listdir(tmp_path / source)
        os.rename(tmp_path / source / name, tmp_path / target)
    run = load_run(tmp_path)
    assert run.steps["loss"].steps.tolist() == list(range(50))
    assert run.steps["loss"].values[0] == 10.0
    assert file_order("events.out.tfevents.1700000000.host.42.9.v2") < file_order(
        "events.out.tfevents.1700000000.host.42.10.v2") < file_order(
        "events.out.tfevents.1700000001.host.42.1.v2")
