"""Live warnings use the report's detectors on a bounded window of fed data."""

import numpy as np

from instrumentation.live import LiveDiagnosis, warning_line


def _rows(start, count, loss, grad=1.0, nonfinite=0.0):
    steps = np.arange(start, start + count, dtype=np.float64)
    return np.stack([steps, np.broadcast_to(loss, steps.shape), np.full(count, grad),
                     np.full(count, nonfinite), np.full(count, 1e-3)], axis=1)


def test_nan_is_announced_once_with_its_first_step():
    live = LiveDiagnosis("run", min_interval=0.0)
    rng = np.random.default_rng(0)
    live.feed_steps(_rows(0, 50, 1.0 + 0.01 * rng.standard_normal(50)))
    assert live.check() == []
    block = _rows(50, 50, 1.0)
    block[20:, 1] = np.nan
    block[20:, 3] = 7
    live.feed_steps(block)
    findings = live.check()
    assert [(f.kind, f.first_step) for f in findings] == [("nan_inf", 70)]
    assert live.check() == []  # announced once
    line = warning_line(findings[0], "logs/run")
    assert line.startswith("tb-stability: CRITICAL nan_inf at step 70") and "\n" not in line


def test_window_is_bounded():
    live = LiveDiagnosis("run", window_steps=100, window_records=3)
    for start in range(0, 10_000, 10):
        live.feed_steps(_rows(start, 10, 1.0))
        live.feed_variables(start, np.ones((3, 2)), ["a", "b"])
    run = live.run_data()
    assert 100 <= len(run.steps["loss"]) < 110
    assert run.steps["loss"].steps[-1] == 9999
    assert len(run.variables["grad_norm"]) == 3


def _stuck_after_blowup(start, count):
    # 2.0 at the first step, 150x up for six steps, then back at about 2.0.
    loss = 2.0 + 0.02 * np.random.default_rng(start).standard_normal(count)
    loss[1:7] = [120.0, 300.0, 200.0, 60.0, 15.0, 6.0]
    return _rows(start, count, loss)


def test_a_blowup_at_the_start_of_the_fit_is_announced():
    live = LiveDiagnosis("run", min_interval=0.0)
    live.feed_steps(_stuck_after_blowup(0, 200))
    findings = live.check()
    assert [(f.kind, f.evidence["early_blowup"], f.first_step) for f in findings] == [
        ("divergence", "stuck", 1)]


def test_the_same_shape_after_the_window_slid_is_not_called_early():
    live = LiveDiagnosis("run", window_steps=200, min_interval=0.0)
    live.feed_steps(_rows(0, 200, 2.0))
    live.feed_steps(_stuck_after_blowup(200, 200))  # the window now starts at step 200
    assert live.run_data().steps["loss"].steps[0] == 200
    assert [f for f in live.check() if f.evidence.get("early_blowup")] == []
    # A new fit (steps restart) holds its start again.
    live.feed_steps(_stuck_after_blowup(0, 200))
    assert [f.evidence.get("early_blowup") for f in live.check()] == ["stuck"]


def test_throttled_between_checks():
    live = LiveDiagnosis("run", min_interval=3600.0)
    live.feed_steps(_rows(0, 10, 1.0))
    live.check()
    live.feed_steps(_rows(10, 10, np.nan, nonfinite=1.0))
    assert live.check() == []
    assert [f.kind for f in live.check(force=True)] == ["nan_inf"]


def _log_zero_fit(log_dir, epochs=6, **callback_kwargs):
    import keras
    import tensorflow as tf

    from instrumentation import StabilityCallback

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 10)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")

    def loss(y_true, y_pred):
        return -tf.reduce_mean(y_true * tf.math.log(y_pred) + (1 - y_true) * tf.math.log(1 - y_pred))

    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=loss)
    callback = StabilityCallback(str(log_dir), every=4, **callback_kwargs)
    return model.fit(x, y, epochs=epochs, batch_size=32, verbose=0, callbacks=[callback])


def _live_lines(caplog):
    return [r.getMessage() for r in caplog.records if "tb-stability: CRITICAL" in r.getMessage()]


def test_real_fit_prints_one_line_per_critical_kind(tmp_path, caplog):
    caplog.set_level("WARNING", logger="tb_stability")
    history = _log_zero_fit(tmp_path / "run")
    lines = _live_lines(caplog)
    assert len(history.history["loss"]) == 6
    assert sum("nan_inf" in line for line in lines) == 1, lines
    assert len(lines) == len(set(line.split(" at ")[0] for line in lines))  # one per kind


def test_live_warnings_can_be_turned_off(tmp_path, caplog):
    caplog.set_level("WARNING", logger="tb_stability")
    _log_zero_fit(tmp_path / "run", live_warnings=False)
    assert _live_lines(caplog) == []


def test_stop_on_nan_stops_training_after_flushing(tmp_path):
    from tb_stability.reader import load_logdir

    history = _log_zero_fit(tmp_path / "run", epochs=20, stop_on_nan=True)
    assert len(history.history["loss"]) < 20
    steps = load_logdir(str(tmp_path / "run")).runs["."].steps
    loss = steps["loss"].values
    first_bad = int(np.argmax(~np.isfinite(loss)))
    assert not np.isfinite(loss[first_bad])
    # Stopped within `every` (+ the epoch's remaining batch) steps of the first NaN.
    assert steps["loss"].steps[-1] - steps["loss"].steps[first_bad] <= 4
