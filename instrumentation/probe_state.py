"""One probed activation: its kind, its device-side slots and their statistics.

`instrumentation.activation_kinds.classify` decides what a layer's activation
is (ReLU family, saturating with which limits, linear, other); `Probe` holds
one layer's float64 ``[slots, 6]`` statistics (`COLUMNS`: step, count,
saturated, first two moments about a center) and float32 ``[slots, units]``
largest output per unit (a unit fired when it is > 0), computes one call's
contribution in graph (`Probe.contribution`), writes or adds it into a slot,
and turns the slots back into per-step quantities on the host
(`Probe.values`). `instrumentation.probes` wraps the layers and decides when
these run.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf

from instrumentation import readback
from instrumentation.graph_ops import rare_cond, ring_slot

PRE_THRESHOLD = 5.0  # |x| >= 5: derivative of sigmoid/tanh ~ 0 (DeepDiagnosis)
LIMIT_TOLERANCE = 1e-3
LARGE_EXAMPLE = 2048
"""Elements per example from which a single call's moments skip the centring pass.

Centring an activation (``out - mean``) writes a temporary as large as the
activation: for a convolution's output that pass and the mean's cost more than
the statistics' other reductions together (``[64, 26, 26, 16]``: ~420 µs
against ~190 µs). Above this size the moments are raw sums unless
`VARIANCE_GUARD` says they cancel; below it the centring is cheaper than the
guard's ``If``.
"""
VARIANCE_GUARD = 1e-2
"""Raw float32 sums are kept when the variance is at least this share of the mean square.

``var = E[x²] - E[x]²`` from float32 sums loses about ``E[x²] / var`` times
their rounding (~1e-6 relative): at this bound at most ~1e-4 of the variance.
Below it (an activation whose mean is over ~10 standard deviations) a
`rare_cond` centres the activation on its mean, as for small activations.
"""
UNIT_SUM_MEAN = True
"""Whether a small single call's mean comes from per-unit sums (`Probe._centre`).

False restores one ``reduce_mean`` of the whole activation (and the per-unit
maximum as ``fired``): ``benchmarks/overhead_steps.py --switch
instrumentation.probe_state.UNIT_SUM_MEAN=False`` measures the difference.
"""
# Element-wise, monotone activations whose |pre| >= 5 rule is a bound on the output.
_ELEMENTWISE_PRE_RULE = {"sigmoid": tf.math.sigmoid, "tanh": tf.math.tanh}


COLUMNS = ("step", "count", "saturated", "sum", "half_sum_sq", "center")
STEP, COUNT, SATURATED, SUM, HALF_SUM_SQ, CENTER = range(len(COLUMNS))
MEAN_COLUMNS = ("calls", "saturated_mean", "mean", "mean_sq")


class Probe:
    """State of one probed activation (one layer).

    ``stats`` is float64 ``[slots, 6]`` (`COLUMNS`): per slot the step, the
    element count, the saturated count and the first two moments about
    ``center``: ``sum = Σ(x - center)``, ``half_sum_sq = Σ(x - center)² / 2``
    (what one fused ``L2Loss`` gives). An additive row (`contribution`) has
    ``center = 0`` and raw sums, so the rows of an unbounded RNN cell's
    timesteps add up in the slot; a single call's row
    (``centered=True``) is centred on its own mean (``sum = 0``), which costs
    fewer ops and keeps the variance exact for any mean. ``fired`` is float32
    ``[slots, units]``: each unit's largest output (ReLU family: > 0 exactly
    where the input is), so a unit fired when its value is ``> 0``; slots are
    cleared to 0. ``means`` (bounded RNN cells only) is float32 ``[slots, 4]``
    (`MEAN_COLUMNS`): inside the time loop each call adds its *means* there
    (every call of one step has the same batch and units, so their average is
    the step's), which needs no element count and no float64 cast per call.
    """

    def __init__(self, name: str, kind: str, limits, is_output: bool, activation: str = "",
                 cell: bool = False):
        self.name = name
        self.cell = cell  # an RNN cell's activation: called once per timestep
        self.kind = kind
        self.limits = limits
        self.is_output = is_output
        self.activation = activation
        self.every = 1
        self.slots = 2
        self.stats = None  # float64 [slots, 6]: see COLUMNS
        self.fired = None  # float32 [slots, units]: largest output per unit
        self.means = None  # float32 [slots, 4] for bounded RNN cells: see MEAN_COLUMNS
        self.units = 1  # of the last traced call
        # The activation's outputs are never negative (plain ReLU): set by the wrapper.
        self.nonnegative = False
        self._bounds = None

    def ensure_variables_for(self, out) -> int:
        """Creates the variables for an activation shaped like ``out``; returns its units."""
        units = self.units = units_of(out)
        self.ensure_variables(units)
        return units

    def ensure_variables(self, units: int) -> None:
        if self.fired is not None and tuple(self.fired.shape) == (self.slots, units):
            return
        with tf.init_scope():
            empty = np.zeros([self.slots, len(COLUMNS)])
            empty[:, STEP] = -1.0
            self.stats = tf.Variable(empty, dtype=tf.float64, trainable=False,
                                     name="stability_probe")
            self.fired = tf.Variable(tf.zeros([self.slots, units], tf.float32),
                                     trainable=False, name="stability_probe_fired")
            self.means = None
            if self.averages_calls:
                self.means = tf.Variable(tf.zeros([self.slots, len(MEAN_COLUMNS)], tf.float32),
                                         trainable=False, name="stability_probe_means")

    def reset(self) -> None:
        """Marks every slot of its own variables unused (eager, host side)."""
        if self.stats is not None:
            unused = tf.fill(self.stats.shape[:1], tf.constant(-1.0, tf.float64))
            self.stats[:, STEP].assign(unused)

    @property
    def averages_calls(self) -> bool:
        """Whether calls inside a loop add means (`mean_contribution`): bounded RNN cells."""
        return self.cell and self._bounded()

    def _bounded(self) -> bool:
        return self.kind == "saturating" and max(abs(x) for x in self.limits) <= 1.0

    def saturation_bounds(self) -> tuple[float, float]:
        """Output values at or beyond which an element counts as saturated.

        Within `LIMIT_TOLERANCE` of a limit; for the element-wise sigmoid and
        tanh also ``|pre-activation| >= 5``, which for a monotone function is
        the output at ``-5`` / ``+5`` (evaluated once with the same kernel).
        """
        if self._bounds is None:
            lo, hi = self.limits
            tol = LIMIT_TOLERANCE * (hi - lo)
            low, high = lo + tol, hi - tol
            function = _ELEMENTWISE_PRE_RULE.get(self.activation)
            if function is not None:
                with tf.init_scope():
                    at = function(tf.constant([-PRE_THRESHOLD, PRE_THRESHOLD], tf.float32))
                    at = np.asarray(at, np.float32)
                low, high = max(low, float(at[0])), min(high, float(at[1]))
            self._bounds = (np.float32(low), np.float32(high))
        return self._bounds

    def contribution(self, pre, out, centered: bool = False
                     ) -> tuple[tf.Tensor, Optional[tf.Tensor]]:
        """Statistics of one call (graph side): ``(row, fired)``.

        ``row`` is float64 ``[0, count, saturated, sum, half_sum_sq, center]``
        (`COLUMNS`, a zero in the step column) from float32 reductions: no
        float64 copy of the activation. By default the row is additive
        (``center = 0``): bounded outputs (sigmoid, tanh, ...: ``|x| <= 1``)
        are summed directly, unbounded ones are centred on their mean first
        and the raw sums formed in float64, so the standard deviation survives
        a large mean. ``centered=True`` (a single call per step) keeps them
        centred on the mean instead: fewer ops, not additive; from
        `LARGE_EXAMPLE` elements per example it holds raw sums instead, unless
        they would cancel (`_raw_moments`). ``fired`` (ReLU family only, else
        None) is each unit's largest output in this call (of the
        pre-activation for PReLU; its sum for a large non-negative one), > 0
        where the unit fired. Few ops on purpose: inside an RNN loop this runs
        at every timestep.
        """
        out = tf.cast(out, tf.float32)
        units = self.units = units_of(out)  # variables: by whoever writes the row
        saturated = tf.constant(0.0, tf.float32)
        if self.kind == "saturating":
            saturated = tf.reduce_sum(self._saturated(pre, out))
        bounded = self._bounded()
        fired = None
        if bounded or centered:
            size = out.shape.num_elements()  # None with a dynamic batch size
            count = float(size) if size is not None else tf.cast(tf.size(out), tf.float32)
            if bounded:
                first, second, center = tf.reduce_sum(out), tf.nn.l2_loss(out), 0.0
            elif _large(out):
                (first, second, center), fired = self._raw_moments(out, count, units)
            else:
                center, fired = self._centre(out, count, units)
                first, second = 0.0, tf.nn.l2_loss(out - center)
            row = tf.cast(tf.stack([0.0, count, saturated, first, second, center]),
                          tf.float64)  # one float32 vector, one cast
        else:  # unbounded and additive: raw sums formed in float64 from centred moments
            count = tf.cast(tf.size(out), tf.float64)
            mean = tf.reduce_mean(out)
            mean64 = tf.cast(mean, tf.float64)
            centred = tf.cast(tf.nn.l2_loss(out - mean), tf.float64)
            total = count * mean64
            total_sq = centred + 0.5 * total * mean64
            zero = tf.constant(0.0, tf.float64)
            row = tf.stack([zero, count, tf.cast(saturated, tf.float64), total, total_sq, zero])
        if self.kind == "relu" and fired is None:
            # In the ReLU family the output is > 0 exactly where the input is,
            # so the output serves and the pre-activation stays free for the
            # kernel fusions (MatMul + BiasAdd + Relu). PReLU's learned slope
            # may be negative: its input is used.
            use_pre = pre is not None and self.activation == "prelu"
            source = tf.cast(pre if use_pre else out, tf.float32)
            fired = tf.reduce_max(_by_unit(source, units), axis=0)
        return row, fired

    def _centre(self, out, count, units: int) -> tuple[tf.Tensor, Optional[tf.Tensor]]:
        """The mean of a small single call, and its per-unit sums where they serve as ``fired``.

        The mean comes from per-unit sums (an axis-0 reduction, then a sum of
        ``units`` values), not from one reduction of the whole activation.
        Among the step's other kernels that measured cheaper, though alone
        it is not: six chained ``[64, 256]`` ReLU layers' statistics cost
        +150 µs with ``reduce_mean`` and the per-unit maximum, +75 µs with
        per-unit sums in their place (the benchmarks' MLP at ``every=1``:
        1.122 -> 1.100). For a non-negative ReLU the per-unit sums double as
        ``fired``, as in `_raw_moments`; otherwise ``fired`` is None.
        """
        if not UNIT_SUM_MEAN:
            return tf.reduce_mean(out), None
        total, by_unit = self._unit_sums(out, units)
        return total / count, by_unit if self._sums_fire else None

    @property
    def _sums_fire(self) -> bool:
        """Whether per-unit sums serve as ``fired`` (a plain ReLU).

        A sum of non-negative values is > 0 exactly where one of them is.
        """
        return self.nonnegative and self.kind == "relu"

    @staticmethod
    def _unit_sums(out, units: int) -> tuple[tf.Tensor, tf.Tensor]:
        """``(sum of out, per-unit sums)``: an axis-0 reduction, then the units."""
        by_unit = tf.reduce_sum(_by_unit(out, units), axis=0)
        return tf.reduce_sum(by_unit), by_unit

    def _raw_moments(self, out, count, units: int) -> tuple[tuple, Optional[tf.Tensor]]:
        """``(first, second, center)`` of a large single call without a centring pass.

        Two reads of ``out`` and no temporary: its sum and one fused
        ``L2Loss``. For a non-negative activation (`nonnegative`) the sum is
        taken per unit, and those sums double as ``fired`` (a sum of
        non-negative values is > 0 exactly where one of them is), which
        saves the per-unit maximum's pass; otherwise ``fired`` is None. Only
        where the raw sums would cancel (`VARIANCE_GUARD`) does a
        `rare_cond` centre the activation on its mean.
        """
        if self._sums_fire:
            total, fired = self._unit_sums(out, units)
        else:
            total, fired = tf.reduce_sum(out), None
        half = tf.nn.l2_loss(out)
        mean = total / count
        cancels = mean * mean > (1.0 - VARIANCE_GUARD) * (2.0 * half / count)

        def centred():
            return tf.stack([0.0, tf.nn.l2_loss(out - mean), mean])

        def raw():
            return tf.stack([total, half, 0.0])

        return tuple(tf.unstack(rare_cond(cancels, centred, raw))), fired

    def _saturated(self, pre, out) -> tf.Tensor:
        """1.0 where an element of ``out`` (float32) is saturated, else 0.0."""
        low, high = self.saturation_bounds()
        middle, half = (low + high) / np.float32(2), (high - low) / np.float32(2)
        near = tf.abs(out - middle if middle else out) >= half
        if pre is not None and self.activation not in _ELEMENTWISE_PRE_RULE \
                and activation_name_known_pre(self):
            near = tf.logical_or(near, tf.abs(tf.cast(pre, tf.float32)) >= PRE_THRESHOLD)
        return tf.cast(near, tf.float32)

    def mean_contribution(self, pre, out) -> tf.Tensor:
        """One call's float32 ``[1, saturated, mean, mean_sq]`` (`MEAN_COLUMNS`; graph side).

        For a bounded activation called inside a loop (`averages_calls`): no
        element count and no float64 cast, a few ops less per timestep.
        """
        out = tf.cast(out, tf.float32)
        self.ensure_variables_for(out)
        return tf.stack([1.0, tf.reduce_mean(self._saturated(pre, out)), tf.reduce_mean(out),
                         tf.reduce_mean(tf.square(out))])

    def add_means(self, slot, row) -> None:
        """Adds a `mean_contribution` row to ``slot`` (cleared by `write` of the step)."""
        tf.raw_ops.ResourceScatterAdd(resource=self.means.handle, indices=slot, updates=row)

    def slot(self, step) -> tf.Tensor:
        """The ring slot of ``step`` (graph side)."""
        return ring_slot(step, self.every, self.slots)

    def write(self, step, slot, row, fired) -> None:
        """Sets ``slot`` to one step's row (graph side).

        Args:
          step: The step, as a float64 ``[1]`` vector or an integer scalar.
        """
        self.ensure_variables(self.units)
        if step.dtype != tf.float64 or step.shape.rank != 1:
            step = tf.reshape(tf.cast(step, tf.float64), [1])
        row = tf.concat([step, row[1:]], 0)
        tf.raw_ops.ResourceScatterUpdate(resource=self.stats.handle, indices=slot, updates=row)
        if fired is None:
            fired = tf.zeros(self.fired.shape[1:], tf.float32)
        tf.raw_ops.ResourceScatterUpdate(resource=self.fired.handle, indices=slot, updates=fired)
        if self.means is not None:  # a row written here is not an average of calls
            tf.raw_ops.ResourceScatterUpdate(resource=self.means.handle, indices=slot,
                                             updates=tf.zeros([len(MEAN_COLUMNS)], tf.float32))

    def accumulate(self, slot, row, fired) -> None:
        """Adds an additive contribution row to ``slot`` (after `write` of the same step)."""
        tf.raw_ops.ResourceScatterAdd(resource=self.stats.handle, indices=slot, updates=row)
        if fired is not None:
            tf.raw_ops.ResourceScatterMax(resource=self.fired.handle, indices=slot,
                                          updates=fired)

    def values(self, batch=None) -> list[tuple[int, dict]]:
        """Host side: ``(step, {quantity: value})`` of every recorded slot, by step.

        Args:
          batch: Optional `readback.BatchedRead` holding this read's values.
        """
        if self.stats is None:
            return []
        means = readback.fetch(self.means, batch) if self.means is not None else None
        fired = readback.fetch(self.fired, batch) if self.kind == "relu" else None
        return self.values_of(readback.fetch(self.stats, batch), fired, means)

    def values_of(self, stats: np.ndarray, fired: Optional[np.ndarray],
                  means: Optional[np.ndarray] = None) -> list[tuple[int, dict]]:
        """`values` from the host copies of the slots (``fired`` for the ReLU family).

        Args:
          stats: ``[slots, 6]`` rows (`COLUMNS`).
          fired: ``[slots, units]`` largest outputs (ReLU family), else None.
          means: ``[slots, 4]`` per-call means (bounded RNN cells), else None.
        """
        calls = np.zeros(len(stats))
        if means is not None:
            means = means.astype(np.float64)
            calls = means[:, 0]
        order = np.argsort(stats[:, STEP], kind="stable")
        order = order[(stats[order, STEP] >= 0) & ((stats[order, COUNT] > 0) | (calls[order] > 0))]
        if not order.size:
            return []
        rows = stats[order]
        with np.errstate(divide="ignore", invalid="ignore"):
            count = rows[:, COUNT]
            shift = rows[:, SUM] / count
            mean = rows[:, CENTER] + shift
            var = 2.0 * rows[:, HALF_SUM_SQ] / count - shift * shift
            saturated = rows[:, SATURATED] / count
            if means is not None:  # slots whose calls added means
                averaged = calls[order] > 0
                per_call = means[order] / np.where(averaged, calls[order], 1.0)[:, None]
                mean = np.where(averaged, per_call[:, 2], mean)
                var = np.where(averaged, per_call[:, 3] - per_call[:, 2] ** 2, var)
                saturated = np.where(averaged, per_call[:, 1], saturated)
        columns = {"act_mean": mean, "act_std": np.sqrt(np.maximum(var, 0.0))}
        if self.kind == "relu":
            fired = fired[order] > 0
            columns["dead_fraction"] = 1.0 - fired.mean(axis=1, dtype=np.float64)
        if self.kind == "saturating" and not self.is_output:
            columns["saturated_fraction"] = saturated
        names = list(columns)
        table = np.stack([columns[name] for name in names], axis=1).tolist()
        return [(int(step), dict(zip(names, values)))
                for step, values in zip(rows[:, STEP].tolist(), table)]


def _large(out) -> bool:
    """Whether ``out`` has at least `LARGE_EXAMPLE` elements per example (static shape)."""
    per_example = out.shape[1:].num_elements() if out.shape.rank else None
    return per_example is not None and per_example >= LARGE_EXAMPLE


def _by_unit(tensor, units: int) -> tf.Tensor:
    """``tensor`` as ``[-1, units]`` (itself when it already is)."""
    if tensor.shape.rank == 2 and tensor.shape[-1] == units:
        return tensor
    return tf.reshape(tensor, [-1, units])


def units_of(out) -> int:
    """Units (last axis) of an activation tensor; 1 when unknown while tracing."""
    return int(out.shape[-1]) if out.shape.rank and out.shape[-1] is not None else 1


def activation_name_known_pre(probe: Probe) -> bool:
    """Whether the |pre-activation| >= 5 rule applies (standard sigmoid/tanh)."""
    return probe.limits in ((0.0, 1.0), (-1.0, 1.0)) and probe.kind == "saturating"
