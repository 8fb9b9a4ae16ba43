"""A learning rate that decayed to ~0 is named as the cause of tiny updates, not "raise the rate".

`ExponentialDecay(1e-3, decay_steps=5, decay_rate=0.5)` (decay_steps meant as
epochs) halves the rate every 5 batches; update_ratio_low used to answer with
"raise the learning rate ~10000x: Adam(learning_rate=9e-23)".
"""

import numpy as np
import pytest

from tb_stability.analysis import analyze_logdir, report_to_json
from tb_stability.detectors import _lr_decay
from tests import detectors_support as S

STEPS = np.arange(400)


@pytest.mark.parametrize("lr, stopped", [
    pytest.param(1e-3 * 0.5 ** (STEPS / 5), 34, id="halved-every-5-steps"),
    pytest.param(np.where(STEPS < 100, 1e-2, 1e-7), 100, id="cut-to-1e-5-of-it-at-step-100"),
    pytest.param(1e-3 * 0.5 * (1 + np.cos(np.pi * STEPS / 399)), None, id="cosine-to-0-at-the-end"),
    pytest.param(np.full(400, 1e-3), None, id="constant"),
    pytest.param(1e-3 * 0.1 ** (STEPS // 100), None, id="10x-down-every-100-steps-ends-at-1e-3"),
])
def test_a_decay_to_nothing_against_hand_made_rates(lr, stopped):
    got = _lr_decay.decayed(S.make_run(S.healthy_loss(400), lr=lr))
    assert (got and got.stopped_step) == stopped, got


tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


def _fit(logdir, learning_rate, callbacks=()):
    from instrumentation import StabilityCallback

    data = np.random.default_rng(0)
    x = data.normal(size=(4096, 10)).astype("float32")
    y = np.tanh(x @ data.normal(size=(10, 1))).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(learning_rate), "mse")
    history = model.fit(x, y, batch_size=32, epochs=3, verbose=0,
                        callbacks=[StabilityCallback(str(logdir), every=10), *callbacks])
    report = analyze_logdir(str(logdir))
    return {f.kind: f for r in report.runs for f in r.findings}, history.history["loss"][-1], report


def test_a_schedule_meant_in_epochs_is_named_and_its_remedy_trains(tmp_path):
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-3, decay_steps=5, decay_rate=0.5)
    found, stuck_loss, report = _fit(tmp_path / "decayed", schedule)
    low = found["update_ratio_low"]
    assert "decay_steps=5, and the run lasted 384 steps" in low.explanation, report_to_json(report)
    assert low.evidence["learning_rate_below_1pct_from_step"] == 34
    assert "learning_rate=9e-23" not in low.remedy and "Raise" not in low.remedy
    snippet = [line.strip() for line in low.remedy.splitlines() if line.strip().startswith("lr = ")]
    assert snippet == ["lr = keras.optimizers.schedules.ExponentialDecay(initial_learning_rate=0.001, "
                       "decay_steps=384, decay_rate=0.5, staircase=False)  # this run's length; 128 "
                       "steps per epoch"]
    fixed = eval(snippet[0][len("lr = "):].split("  #")[0], {"keras": keras})
    found, loss, report = _fit(tmp_path / "fixed", fixed)
    assert "update_ratio_low" not in found, report_to_json(report)
    assert loss < 0.5 * stuck_loss


def test_a_callback_that_keeps_cutting_the_rate_is_given_a_floor(tmp_path):
    cut = keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr if epoch == 0 else lr * 1e-4)
    found, _, report = _fit(tmp_path / "run", 1e-3, [cut])
    low = found["update_ratio_low"]
    assert "fell from 0.001 (step 0)" in low.explanation, report_to_json(report)
    assert "min_lr=1e-06" in low.remedy and "max(schedule(epoch, lr), 1e-06)" in low.remedy
