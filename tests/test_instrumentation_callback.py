"""`StabilityCallback` end to end: real `model.fit` runs writing real event files."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.test_instrumentation_support import (
    ManualStep,
    column,
    data,
    make_model,
    read_events,
    reference_run,
    run_infos,
    step_rows,
    var_vectors,
)

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from instrumentation import StabilityCallback  # noqa: E402
from tb_stability import schema  # noqa: E402

LR = 0.05
BATCH = 8


def fit(model, log_dir=None, every=2, epochs=1, jit=False, x=None, y=None, callbacks=(),
        read_every=None, **kw):
    if x is None:
        x, y = data()
    if getattr(model, "optimizer", None) is None:
        model.compile(keras.optimizers.SGD(LR), "mse", jit_compile=jit)
    cbs = list(callbacks)
    if log_dir is not None:
        cbs.insert(0, StabilityCallback(str(log_dir), every=every, read_every=read_every))
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=cbs, **kw)
    return cbs[0] if log_dir is not None else None


def assert_close(actual, expected, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=rtol, atol=1e-9)


def assert_norms_match(events, rows, ref, steps, every):
    """The global gradient norm of every step and the per-variable vectors of log steps."""
    assert_close(column(rows, "grad_norm"), ref["grad_norm"])
    grads, weights = var_vectors(events, "grad_norm"), var_vectors(events, "weight_norm")
    ratios = var_vectors(events, "update_ratio")
    assert sorted(grads) == list(range(0, steps, every))
    for step in grads:
        assert_close(grads[step], ref["var_grad"][step])
        assert_close(weights[step], ref["var_weight"][step])
        assert_close(ratios[step], ref["var_ratio"][step], rtol=1e-4)


def test_writes_exactly_the_contract_tags(tmp_path):
    model = make_model("sequential")
    x, y = data(n=44)  # 6 steps, the last one a partial batch (a retrace)
    fit(model, tmp_path, every=4, x=x, y=y)
    events = read_events(tmp_path)
    expected = {(".", schema.TAG_STEPS), (".", schema.TAG_RUN_INFO), (".", schema.TAG_INPUTS),
                (".", schema.TAG_TARGETS),  # an MSE on float labels: regression targets
                (".", "epoch_loss")} | {
        (".", schema.variable_tag(q)) for q in schema.VARIABLE_QUANTITIES
    } | {  # the tanh hidden layer: a saturating activation, so no dead fraction
        (".", schema.layer_tag(q)) for q in ("saturated_fraction", "act_mean", "act_std")
    }
    assert set(events) == expected
    rows = step_rows(events)
    assert column(rows, "step").tolist() == list(range(6))  # every step exactly once
    for event in events[(".", schema.TAG_STEPS)]:
        assert event.value.dtype == np.float64 and event.value.shape[1] == len(schema.STEP_COLUMNS)
        assert event.step == int(event.value[-1, 0])
        assert event.content.quantity == "steps"
        assert event.content.names == schema.STEP_COLUMNS
    names = tuple(v.path for v in model.trainable_variables)
    for quantity in schema.VARIABLE_QUANTITIES:
        vectors = events[(".", schema.variable_tag(quantity))]
        assert [e.step for e in vectors] == [0, 4]
        for event in vectors:
            assert event.value.dtype == np.float32 and event.value.shape == (len(names),)
            assert event.content.names == names and event.content.quantity == quantity
    # Each probed batch's labels: mean/std/min/max against numpy (no shuffle: step s is rows 8s..).
    targets = events[(".", schema.TAG_TARGETS)]
    assert [e.step for e in targets] == [0, 4]
    for event in targets:
        batch = y[event.step * BATCH:(event.step + 1) * BATCH].astype(np.float64)
        reference = [batch.mean(0), batch.std(0), batch.min(0), batch.max(0)]
        assert event.content.names == ("y[0]",) and event.content.rows == schema.INPUT_ROWS
        assert_close(event.value, np.stack(reference), rtol=1e-5)
    (info,) = run_infos(events)
    assert info["every"] == 4 and info["optimizer"] == "SGD" and info["model_class"] == "Sequential"
    assert info["variables"] == list(names) and info["loss"] == "mse"
    assert info["learning_rate"] == pytest.approx(LR)
    assert info["tb_stability_version"]
    assert column(rows, "learning_rate") == pytest.approx([LR] * 6)
    assert (column(rows, "nonfinite_grads") == 0).all()


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_matches_gradient_tape_reference(tmp_path, kind, jit):
    x, y = data()
    steps = len(x) // BATCH
    model = make_model(kind)
    fit(model, tmp_path, every=2, jit=jit, x=x, y=y)
    ref = reference_run(x, y, LR, BATCH, steps)
    for got, want in zip(model.trainable_variables, ref["weights"]):  # same training
        assert_close(got, want, rtol=1e-4)

    events = read_events(tmp_path)
    rows = step_rows(events)
    assert column(rows, "step").tolist() == list(range(steps))
    # Raw per-batch loss, not Keras' running mean.
    assert_close(column(rows, "loss"), ref["loss"])
    assert_norms_match(events, rows, ref, steps, every=2)


def test_xla_norms_of_a_wide_layer_match_the_reference(tmp_path, monkeypatch):
    """Under XLA on a CPU a 256x5 kernel (1,280 values) is summed by a product with ones."""
    from instrumentation import gradient_sums as stats_module  # the gradient norms

    seen = []
    original = stats_module.half_sum_squares

    def spy(tensor, xla=False):
        seen.append((xla, tf.convert_to_tensor(tensor).shape.num_elements()))
        return original(tensor, xla=xla)

    monkeypatch.setattr(stats_module, "half_sum_squares", spy)
    features = 256
    x, y = data(features=features)
    steps = len(x) // BATCH
    model = make_model("functional", features)
    fit(model, tmp_path, every=2, jit=True, x=x, y=y)
    assert (True, features * 5) in seen and all(xla for xla, _ in seen)
    ref = reference_run(x, y, LR, BATCH, steps, features=features)
    events = read_events(tmp_path)
    rows = step_rows(events)
    assert_norms_match(events, rows, ref, steps, every=2)


def test_nan_step_is_recorded_and_flushed_at_once(tmp_path):
    x, y = data()
    nan_step = 3
    x = x.copy()
    x[nan_step * BATCH + 1, 2] = np.nan
    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == nan_step and not seen:  # the host read steps 2..3 right after this step
                seen.update(read_events(tmp_path))

    model = make_model("sequential")
    fit(model, tmp_path, every=2, epochs=2, x=x, y=y, callbacks=[Probe()], read_every=2)
    assert seen, "nothing was on disk right after the non-finite step"
    rows = step_rows(seen)
    assert column(rows, "step").tolist() == list(range(nan_step + 1))
    nonfinite = column(rows, "nonfinite_grads")
    assert (nonfinite[:nan_step] == 0).all() and nonfinite[nan_step] > 0
    assert np.isfinite(column(rows, "loss")[:nan_step]).all()
    assert np.isnan(column(rows, "loss")[nan_step])
    # The full run is complete on disk at the end as well.
    assert column(step_rows(read_events(tmp_path)), "step").tolist() == list(range(12))


def test_two_fits_with_callback_then_one_without(tmp_path):
    model = make_model("functional")
    callback = fit(model, tmp_path, every=4)
    fit(model, callbacks=[callback])
    stats = callback._stats
    ring_before = stats.ring.numpy().copy()
    fit(model)  # no callback: none of our ops or wrappers remain
    assert "apply" not in vars(model.optimizer) and "scale_loss" not in vars(model.optimizer)
    assert "compute_loss" not in vars(model) and "fit" not in vars(model)
    np.testing.assert_array_equal(stats.ring.numpy(), ring_before)
    assert int(model.optimizer.iterations.numpy()) == 18

    events = read_events(tmp_path)
    assert column(step_rows(events), "step").tolist() == list(range(12))
    assert [e.step for e in events[(".", schema.TAG_RUN_INFO)]] == [0, 6]
    assert sorted(var_vectors(events, "grad_norm")) == [0, 4, 8]


class Boom(keras.layers.Layer):
    """Raises (InvalidArgumentError) in the compiled step when its input is non-finite."""

    def call(self, inputs):
        return tf.debugging.check_numerics(inputs, "boom")


def test_error_mid_epoch_keeps_steps_on_disk(tmp_path):
    x, y = data()
    x = x.copy()
    x[4 * BATCH, 0] = np.nan  # step 4 raises
    model = keras.Sequential([keras.Input((4,)), Boom(), keras.layers.Dense(1)])
    with pytest.raises(tf.errors.InvalidArgumentError):
        fit(model, tmp_path, every=100, x=x, y=y)
    # Readable at once, although every=100 means no periodic read happened.
    assert column(step_rows(read_events(tmp_path)), "step").tolist() == [0, 1, 2, 3]
    assert "apply" not in vars(model.optimizer) and model.train_function is None
    fit(model, x=x[:32], y=y[:32])  # training without the callback still works


def test_error_outside_train_step_is_cleaned_up_by_next_fit(tmp_path):
    class Fails(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError("user callback failed")

    model = make_model("sequential")
    with pytest.raises(RuntimeError):
        fit(model, tmp_path, every=100, callbacks=[Fails()])
    fit(model)  # the next fit detaches the stale instrumentation first
    assert "apply" not in vars(model.optimizer) and "fit" not in vars(model)
    assert column(step_rows(read_events(tmp_path)), "step").tolist() == list(range(6))


def test_steps_per_execution_and_schedule(tmp_path):
    x, y = data(n=80)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    model = make_model("sequential")
    model.compile(keras.optimizers.SGD(schedule), "mse", steps_per_execution=3)
    fit(model, tmp_path, every=2, x=x, y=y)
    events = read_events(tmp_path)
    rows = step_rows(events)
    assert column(rows, "step").tolist() == list(range(10))
    assert_close(column(rows, "learning_rate"), 0.1 * 0.5 ** np.arange(10))
    assert sorted(var_vectors(events, "grad_norm")) == [0, 2, 4, 6, 8]


def test_compute_loss_fallback_for_custom_train_step(tmp_path):
    class Custom(keras.Model):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True), training=True)
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
            return {"loss": loss}

    x, y = data()
    inputs = keras.Input((4,))
    model = Custom(inputs, keras.layers.Dense(1, kernel_initializer="ones")(inputs))
    fit(model, tmp_path, every=3, x=x, y=y)
    loss = column(step_rows(read_events(tmp_path)), "loss")
    w = np.ones([4, 1])
    assert_close(loss[0], np.mean((x[:BATCH] @ w - y[:BATCH]) ** 2))
    assert np.isfinite(loss).all() and len(loss) == 6


def test_own_failure_is_one_warning_and_training_continues(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    model = make_model("sequential")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, blocker / "run", every=2, epochs=2)
    ours = [w for w in caught if "tb-stability" in str(w.message)]
    assert len(ours) == 1
    assert int(model.optimizer.iterations.numpy()) == 12
    assert "apply" not in vars(model.optimizer)


def test_train_step_without_loss_hooks_records_the_loss_it_returns(tmp_path):
    # No compute_loss/scale_loss to hook: the step's own returned loss is the row's.
    x, y = data()
    steps = len(x) // BATCH
    same = make_model("functional")  # the reference's layers and initialisers
    model = ManualStep(same.inputs, same.outputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fit(model, tmp_path, every=3, x=x, y=y)
    rows = step_rows(read_events(tmp_path))
    assert column(rows, "step").tolist() == list(range(steps))
    ref = reference_run(x, y, LR, BATCH, steps)
    assert_close(column(rows, "loss"), ref["loss"])
    assert_close(column(rows, "grad_norm"), ref["grad_norm"])


@pytest.mark.parametrize("every,spe", [(1, 1), (3, 1), (3, 2)],
                         ids=["every1-always", "every3-two-functions", "every3-spe2-cond"])
def test_log_steps_match_reference_in_every_log_mode(tmp_path, every, spe):
    # every=1: one function, no condition; every>1: the host alternates a
    # log-step function and a lean one; steps_per_execution>1: in-graph cond.
    x, y = data()
    steps = len(x) // BATCH
    model = make_model("functional")
    model.compile(keras.optimizers.SGD(LR), "mse", steps_per_execution=spe)
    callback = fit(model, tmp_path, every=every, x=x, y=y)
    assert not callback._broken
    ref = reference_run(x, y, LR, BATCH, steps)
    events = read_events(tmp_path)
    rows = step_rows(events)
    assert column(rows, "step").tolist() == list(range(steps))
    assert_close(column(rows, "grad_norm"), ref["grad_norm"])
    grads = var_vectors(events, "grad_norm")
    ratios = var_vectors(events, "update_ratio")
    assert sorted(grads) == list(range(0, steps, every))
    for step in grads:
        assert_close(grads[step], ref["var_grad"][step])
        assert_close(ratios[step], ref["var_ratio"][step], rtol=1e-4)
    # Probe and data records of every log step, though the host read them in
    # one go at the end (read_interval(every) > steps): they waited in slots.
    expected = list(range(0, steps, every))
    assert [e.step for e in events[(".", schema.layer_tag("act_mean"))]] == expected
    assert [e.step for e in events[(".", schema.TAG_INPUTS)]] == expected
    # The in-graph cond copies the weights into one snapshot variable (one dtype).
    snapshots = callback._stats.snapshots
    assert (snapshots is None) == (spe == 1)
    if snapshots is not None:
        assert len(snapshots) == 1 and snapshots[0].variable.shape == (
            sum(int(np.prod(v.shape)) for v in model.trainable_variables),)


def _captured_handle_ids(function) -> set:
    """Ids of the tensors (variable handles) the tf.functions in a Keras train function capture."""
    found, seen, stack = set(), set(), [function]
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        if hasattr(fn, "_list_all_concrete_functions"):
            for concrete in fn._list_all_concrete_functions():
                found |= {id(t) for t in concrete.captured_inputs}
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                stack.append(cell.cell_contents)
            except ValueError:
                continue
    return found


def test_steps_between_log_steps_run_a_lean_function(tmp_path):
    # The function the host calls between log steps touches none of the
    # snapshot, per-variable, probe or data variables: those steps pay for the
    # per-step row only.
    model = make_model("functional")
    model.compile(keras.optimizers.SGD(LR), "mse")
    x, y = data()
    callback = StabilityCallback(str(tmp_path), every=3)
    seen = {}

    class Grab(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.update(callback._functions)

    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[callback, Grab()])
    assert set(seen) == {"always", "never"}
    stats, extras = callback._stats, callback._extras
    # The log-step function holds the pre-update weights as tensors: no
    # snapshot variables, no second copy of the weights kept in memory.
    assert stats.measure_update and stats.snapshots is None
    log_only = [stats.var_stats, stats.var_steps,
                *extras.probes.variables(), *extras.data.variables()]
    always = _captured_handle_ids(seen["always"])
    never = _captured_handle_ids(seen["never"])
    log_handles = {id(v.handle) for v in log_only}
    assert log_handles <= always
    assert not log_handles & never
    assert id(stats.ring.handle) in never and id(stats.ring.handle) in always


def test_without_snapshots_the_update_ratio_is_left_out_not_nan(tmp_path, caplog):
    # snapshot_weights=False measures no update ratio: nothing non-finite may
    # be written for it (a NaN vector would read as a critical nan_inf).
    x, y = data()
    model = make_model("sequential")
    model.compile(keras.optimizers.SGD(LR), "mse")
    callback = StabilityCallback(str(tmp_path), every=2, snapshot_weights=False)
    with caplog.at_level("WARNING", logger="instrumentation"):
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                  callbacks=[callback])
    events = read_events(tmp_path)
    assert (".", schema.variable_tag("update_ratio")) not in events
    assert sorted(var_vectors(events, "weight_norm")) == list(range(0, len(x) // BATCH, 2))
    assert not [r for r in caplog.records if "CRITICAL" in r.getMessage()]


class _WeightsEachStep(keras.callbacks.Callback):
    """The model's weights before the first step and after every step."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def on_train_begin(self, logs=None):
        self.weights = [[np.array(w.numpy(), np.float64) for w in self.model.trainable_weights]]

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append([np.array(w.numpy(), np.float64) for w in self.model.trainable_weights])


class CustomSGD(keras.optimizers.SGD):
    """Not a Keras built-in: the callback cannot expect its update tensors."""


def _optimizer(name):
    return {
        "sgd": lambda: keras.optimizers.SGD(LR),  # update tensors: one assign_sub
        "adam": lambda: keras.optimizers.Adam(0.01),
        "momentum": lambda: keras.optimizers.SGD(LR, momentum=0.9),  # assign_add
        "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),  # decay written aside
        "custom": lambda: CustomSGD(LR),  # after - before, capture from the held values
    }[name]()


@pytest.mark.parametrize("constraint", [False, True], ids=["plain", "max-norm-constraint"])
@pytest.mark.parametrize("name", ["sgd", "adam", "momentum", "adamw", "custom"])
def test_update_ratio_is_the_realized_change_for_every_optimizer(tmp_path, name, constraint):
    # The ratio comes from the optimizer's own update tensor where that is the
    # whole change, else from after - before: either way it must equal the
    # change of the weights between two steps (weight decay written aside,
    # a constraint projecting the kernel after the update).
    x, y = data()
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(5, activation="tanh",
                           kernel_constraint=keras.constraints.MaxNorm(0.5) if constraint else None),
        keras.layers.Dense(1)])
    model.compile(_optimizer(name), "mse")
    recorder = _WeightsEachStep()
    fit(model, tmp_path, every=1, x=x, y=y, callbacks=[recorder])
    ratios = var_vectors(read_events(tmp_path), "update_ratio")
    steps = len(x) // BATCH
    assert sorted(ratios) == list(range(steps))
    for step in range(steps):
        before, after = recorder.weights[step], recorder.weights[step + 1]
        want = [np.linalg.norm(a - b) / np.linalg.norm(b) if np.linalg.norm(b) else 0.0
                for a, b in zip(after, before)]  # 0 for the zero-initialised biases at step 0
        assert_close(ratios[step], want, rtol=2e-3)
    assert min(min(ratios[step]) for step in range(1, steps)) > 0
