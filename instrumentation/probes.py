"""Activation probes: dead / saturated fractions, mean and std per layer.

Mechanism (Keras 3, TensorFlow backend):

* `ActivationProbes.attach` replaces, on the layer *instances* only, the
  activation callable of every layer that has one (``Dense``/``Conv``/
  ``Activation`` ``activation=``, an RNN cell's ``activation``) and the
  ``call`` of activation layers (``ReLU``, ``LeakyReLU``, ``ELU``, ``PReLU``,
  ``Softmax``). The wrapper sees the pre-activation and the output.
* The wrappers add ops only while the *train step* is being traced
  (`ActivationProbes.tracing` is set by the callback's ``train_step`` patch),
  so evaluation, prediction and eager calls are untouched. Inside the step,
  on probe steps (a ``tf.cond`` on ``step % every == 0``, or no condition
  at all in the callback's log-step train function), each probe's slot gets
  ``[step, count, saturated, sum, half_sum_sq, center]`` (float64, from
  float32 reductions; `probe_state.COLUMNS`) and each unit's largest output
  (XLA-safe: no summaries, no Python side effects on tensor values); the
  probes of the step's own graph are written together through one
  `probe_table.ProbeTable`. A layer
  called several times in one step (a shared layer) is summed; an RNN cell's
  activation, which runs inside the RNN's time loop, adds into its slot once
  per timestep: a bounded one (tanh, sigmoid) adds its per-call means into a
  float32 slot (`Probe.mean_contribution`), others an additive row. The slot
  is cleared before the loop; the extra call Keras makes before the loop to
  learn the output shape is not counted, nor are calls Keras makes only to
  infer shapes (its symbolic scope: building a subclassed model inside the
  first trace of the step), where no data flows.
* `ActivationProbes.read` (host, every N steps) turns the variables into the
  ``stability/layer/<quantity>`` vectors.

Definitions: a unit (last axis) is *dead* when its pre-activation is never
positive over the batch (ReLU family only); an element is *saturated* when
``|pre-activation| >= 5`` (sigmoid, tanh) or the output is within 1e-3 of
the activation's limits (also softmax and bounded custom callables). The
model's output layer is excluded from ``saturated_fraction`` (a confident
sigmoid/softmax output feeding a cross-entropy is healthy). On a GPU, RNN
layers whose activations are cuDNN's defaults are not probed: wrapping them
would disable the cuDNN kernel.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import tensorflow as tf

from instrumentation import host_jobs
from instrumentation.activation_kinds import activation_name, classify, never_negative
from instrumentation.graph_ops import rare_cond, ring_slot
from instrumentation.instance_patches import InstancePatches
from instrumentation.model_layers import all_layers, output_layers
from instrumentation.probe_state import COLUMNS, Probe
from instrumentation.probe_table import ProbeTable

logger = logging.getLogger("instrumentation")

try:  # Keras' shape inference (compute_output_spec) runs layers in this scope
    from keras.src.backend.common.symbolic_scope import in_symbolic_scope as _in_symbolic_scope
except Exception:  # noqa: BLE001 - another Keras: no such calls are recognised
    def _in_symbolic_scope() -> bool:
        return False

_ACTIVATION_LAYERS = {"ReLU": "relu", "LeakyReLU": "leaky_relu", "ELU": "elu",
                      "PReLU": "prelu", "Softmax": "softmax"}


class ActivationProbes:
    """Per-layer activation statistics every ``every`` steps (see module docstring).

    Args:
      model: The Keras model whose layers are probed.
      every: Probe on steps with ``optimizer.iterations % every == 0``.
      step_fn: Returns the current 0-based step as a tensor (inside the step).
    """

    def __init__(self, model, every: int, step_fn: Callable[[], Any], slots: int = 2):
        self.model = model
        self.every = max(1, int(every))
        self.slots = max(2, int(slots))
        self.step_fn = step_fn
        self.tracing = False
        # "cond" (probe when step % every == 0) or "always" (every traced
        # step is a probe step); see `instrumentation.stats.LOG_MODES`.
        self.log_mode = "cond"
        self.probes: list[Probe] = []
        self.unprobed: dict[str, str] = {}
        self._patches = InstancePatches()
        self._last_step = -1
        self._pending: list = []
        self._opened: set = set()
        self._graph = None
        self._step = None
        self._pred = None
        self._tables: dict = {}  # ProbeTable.key -> ProbeTable

    # --------------------------------------------------------------- install

    def attach(self) -> None:
        """Wraps the activations of every probe-able layer (instances only)."""
        if self._patches:
            return
        outputs = output_layers(self.model)
        gpu = bool(tf.config.list_physical_devices("GPU"))
        known = {p.name: p for p in self.probes}
        cells = set()
        for layer in all_layers(self.model):
            name = layer.name
            if id(layer) in cells:  # an RNN's cell: probed under the RNN's name
                continue
            cell = getattr(layer, "cell", None)
            if cell is not None:
                cells.add(id(cell))
            if cell is not None and callable(getattr(cell, "activation", None)):
                if gpu and activation_name(cell.activation) == "tanh" and activation_name(
                        getattr(cell, "recurrent_activation", None)) == "sigmoid":
                    self.unprobed[name] = "cuDNN-eligible RNN on GPU (wrapping disables cuDNN)"
                    continue
                self._wrap_attr(cell, "activation", name, layer in outputs, known, cell=True)
            elif type(layer).__name__ in _ACTIVATION_LAYERS:
                self._wrap_call(layer, name, layer in outputs, known)
            elif callable(getattr(layer, "activation", None)) and not hasattr(layer, "cell"):
                self._wrap_attr(layer, "activation", name, layer in outputs, known)

    def detach(self) -> None:
        """Restores every wrapped attribute (probe variables are kept)."""
        self._patches.restore(on_error=lambda error, attr: logger.debug(
            "could not restore %s", attr, exc_info=error))

    def _probe(self, name, fn, is_output, known, cell=False) -> Optional[Probe]:
        kind, limits = classify(fn)
        if kind == "linear":
            return None
        probe = known.get(name)
        if probe is None or (probe.kind, probe.limits, probe.activation) != (
                kind, limits, activation_name(fn)):
            probe = Probe(name, kind, limits, is_output, activation_name(fn), cell)
            probe.every, probe.slots = self.every, self.slots
            self.probes = [p for p in self.probes if p.name != name] + [probe]
        return probe

    def _wrap_attr(self, obj, attr, name, is_output, known, cell=False) -> None:
        original = getattr(obj, attr)
        probe = self._probe(name, original, is_output, known, cell)
        if probe is None:
            return
        probe.nonnegative = never_negative(original)
        probes = self

        def activation(x, *args, **kwargs):
            y = original(x, *args, **kwargs)
            probes._record(probe, x, y)
            return y

        activation.__name__ = activation_name(original)
        activation.__wrapped__ = original
        self._patches.set(obj, attr, activation)

    def _wrap_call(self, layer, name, is_output, known) -> None:
        kind_name = _ACTIVATION_LAYERS[type(layer).__name__]
        probe = self._probe(name, _Named(kind_name), is_output, known)
        original = layer.call
        probes = self

        def call(inputs, *args, **kwargs):
            y = original(inputs, *args, **kwargs)
            probes._record(probe, inputs, y)
            return y

        self._patches.set(layer, "call", call)

    # ----------------------------------------------------------------- graph

    def begin_step(self) -> None:
        """Starts a traced train step: computes the probe-step predicate once.

        Called at the start of the train step's trace, in its graph. Probes
        recorded in that graph are summed per probe and written together under
        one ``tf.cond`` (`finish_step`). Probes recorded in a nested graph (an
        RNN cell inside its time loop) add into their slot with one scatter op
        per call, under this predicate captured into the loop body; their slot
        is cleared once in the step's graph, before the loop (`_open`).
        """
        self._pending = []
        self._opened = set()
        self._graph = None
        self._step = self._slot = None
        self._pred = None
        for probe in self.probes:
            probe.every, probe.slots = self.every, self.slots
        try:
            self._graph = tf.compat.v1.get_default_graph()
            self._step = tf.cast(self.step_fn(), tf.int64)
            self._slot = ring_slot(self._step, self.every, self.slots)
            if self.log_mode == "always":  # every traced step probes: no condition
                self._pred = True
            else:
                self._pred = tf.equal(tf.math.floormod(self._step, self.every), 0)
        except Exception:  # noqa: BLE001 - fall back to per-call predicates
            logger.debug("probe predicate failed", exc_info=True)
            self._graph = self._step = self._slot = self._pred = None

    def finish_step(self) -> None:
        """Adds one ``tf.cond`` writing every probe collected in the step's graph."""
        pending, self._pending = getattr(self, "_pending", []), []
        if not pending:
            return
        if self._graph is not tf.compat.v1.get_default_graph():
            return  # not in the graph the activations came from (should not happen)
        step, slot, opened = self._step, self._slot, set(getattr(self, "_opened", ()))
        calls: dict = {}
        for probe, _, _ in pending:
            calls[id(probe)] = calls.get(id(probe), 0) + 1

        def update():
            summed: dict = {}  # a layer called several times in one step: one row
            for probe, pre, out in pending:
                if probe.cell and id(probe) in opened:
                    # Keras runs the cell once before its loop for the output
                    # shape and discards the result; the loop covers every
                    # timestep. Not reading it also lets the call be pruned.
                    continue
                # A layer called once in the step, with no loop adding to its
                # slot, writes a row centred on its own mean (fewer ops); rows
                # that are summed must be additive.
                centered = calls[id(probe)] == 1 and id(probe) not in opened
                try:
                    values, fired = probe.contribution(pre, out, centered=centered)
                except Exception:  # noqa: BLE001 - a probe must never break training
                    logger.debug("probe %s failed", probe.name, exc_info=True)
                    self.unprobed[probe.name] = "probe failed while tracing"
                    continue
                if id(probe) in summed:
                    _, values_before, fired_before = summed[id(probe)]
                    values = values + values_before
                    fired = fired if fired_before is None else tf.maximum(fired, fired_before)
                summed[id(probe)] = (probe, values, fired)
            table = []  # every probe not in a loop: one write for all of them
            for probe, values, fired in summed.values():
                if id(probe) in opened:  # its slot was cleared before an RNN loop
                    probe.accumulate(slot, values, fired)
                else:
                    table.append((probe, values, fired))
            if table:
                self._table([(probe, probe.units) for probe, _, _ in table]).write(
                    step, slot, [values for _, values, _ in table],
                    [fired for _, _, fired in table])
            return tf.constant(True)

        try:
            rare_cond(self._pred, update)
        except Exception:  # noqa: BLE001
            logger.debug("probes failed", exc_info=True)
            for probe, _, _ in pending:
                self.unprobed[probe.name] = "probe failed while tracing"

    def _table(self, entries) -> ProbeTable:
        """The `ProbeTable` of these ``(probe, units)`` (created on first use)."""
        key = ProbeTable.key(entries, self.slots)
        if key not in self._tables:
            # Tables of another slot count belong to an earlier fit (read in full).
            self._tables = {k: t for k, t in self._tables.items() if t.slots == self.slots}
            self._tables[key] = ProbeTable(entries, self.slots)
        return self._tables[key]

    def reset(self) -> None:
        """Forgets every recorded slot (eager; a new fit, whose steps may restart at 0)."""
        self._last_step = -1
        for table in self._tables.values():
            table.reset()
        for probe in self.probes:
            probe.reset()

    def _open(self, probe: Probe, out) -> None:
        """Clears ``probe``'s slot of this step in the step's graph (once per trace).

        Called while a nested graph (a loop body) is traced: the clearing op is
        created in the outer graph now, hence ordered before the loop op that
        will add into the slot.
        """
        if id(probe) in self._opened:
            return
        probe.ensure_variables_for(out)
        step, slot = self._step, self._slot

        def clear():
            probe.write(step, slot, tf.zeros([len(COLUMNS)], tf.float64), None)
            return tf.constant(True)

        with self._graph.as_default():
            rare_cond(self._pred, clear)
        self._opened.add(id(probe))

    def _record(self, probe: Probe, pre, out) -> None:
        if not self.tracing or _in_symbolic_scope():
            return
        try:
            if not (tf.is_tensor(out) and out.dtype.is_floating):
                return
            pre = pre if tf.is_tensor(pre) else None
            graph = tf.compat.v1.get_default_graph()
            pred = getattr(self, "_pred", None)
            if pred is not None and graph is self._graph:
                self._pending.append((probe, pre, out))
                return
            if pred is not None:  # nested graph: add into the slot cleared before the loop
                slot = self._slot  # captured from the train step's graph
                self._open(probe, out)
                if probe.averages_calls:  # bounded cell: per-call means, fewest ops
                    def record():
                        probe.add_means(slot, probe.mean_contribution(pre, out))
                else:
                    def record():
                        probe.accumulate(slot, *probe.contribution(pre, out))
            else:  # no step predicate: each call sets the slot on its own
                step = tf.cast(self.step_fn(), tf.int64)
                pred = tf.equal(tf.math.floormod(step, self.every), 0)

                def record():
                    probe.write(step, probe.slot(step), *probe.contribution(pre, out))

            def update():
                record()
                return tf.constant(True)

            rare_cond(pred, update)
        except Exception:  # noqa: BLE001 - a probe must never break training
            logger.debug("probe %s failed", probe.name, exc_info=True)
            self.unprobed[probe.name] = "probe failed while tracing"

    # ------------------------------------------------------------------ host

    def variables(self) -> list:
        """The probe variables the host reads (for one batched read)."""
        own = [v for p in self.probes for v in (p.stats, p.fired, p.means) if v is not None]
        return own + [v for table in self._tables.values() for v in table.variables()]

    def read(self, batch=None) -> list[tuple[int, dict]]:
        """New probe results, oldest first: ``[(step, {quantity: (names, values)})]``.

        Every probe step recorded since the last read (each probe keeps
        ``slots`` of them) is returned once, with the layers probed at it.

        Args:
          batch: Optional `readback.BatchedRead` holding this read's values.
        """
        # Snapshots: a retrace on the training thread may add a table meanwhile.
        probes, tables = list(self.probes), list(self._tables.values())
        found = []
        for probe in probes:
            host_jobs.pause()  # on the worker thread: the training thread may take the GIL
            found.append((probe, probe.values(batch)))
        for table in tables:
            host_jobs.pause()
            found += table.values(batch)
        order = {id(probe): index for index, probe in enumerate(probes)}
        by_step: dict = {}
        for probe, values in found:
            if id(probe) not in order:  # replaced by a probe of another kind
                continue
            for step, value in values:
                if step > self._last_step:
                    by_step.setdefault(step, []).append((probe, value))
        out = []
        for step in sorted(by_step):
            host_jobs.pause()
            table: dict = {}
            for probe, values in sorted(by_step[step], key=lambda item: order[id(item[0])]):
                for quantity, value in values.items():
                    names, vals = table.setdefault(quantity, ([], []))
                    names.append(probe.name)
                    vals.append(value)
            out.append((step, table))
        if out:
            self._last_step = out[-1][0]
        return out


class _Named:
    """A stand-in callable that only carries an activation name."""

    def __init__(self, name: str):
        self.__name__ = name

    def __call__(self, x):
        return x

