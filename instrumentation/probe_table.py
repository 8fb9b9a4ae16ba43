"""One write per probe step for every probe of the train step's own graph.

Each probed layer's row (`probe_state.Probe.contribution`) used to go into the
layer's own variables: per layer a step column spliced in front of the row
and two scatter ops (row, per-unit maxima). A `ProbeTable` holds those rows
for a fixed list of probes instead: one step per slot, one ``[P, 6]`` block
of rows and one concatenation of the ReLU layers' per-unit maxima, so a
probe step costs three scatters whatever the number of layers (the MLP
of `benchmarks/` has six probed layers: about twenty ops fewer per probe step).

Probes called inside a loop (RNN cells) add into their own slots during the
loop and keep their own variables (`instrumentation.probes`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import tensorflow as tf

from instrumentation import readback
from instrumentation.graph_ops import unused_slot_steps
from instrumentation.probe_state import COLUMNS, STEP, Probe


class ProbeTable:
    """Device-side slots of a fixed list of probes, written together.

    Args:
      entries: ``(probe, units)`` per probe, in write order.
      slots: Slots of the ring (as the probes').
    """

    def __init__(self, entries: Sequence[tuple[Probe, int]], slots: int):
        self.probes = [probe for probe, _ in entries]
        self.slots = int(slots)
        self.fired_spans: list[Optional[tuple[int, int]]] = []
        offset = 0
        for probe, units in entries:
            if probe.kind == "relu":
                self.fired_spans.append((offset, offset + int(units)))
                offset += int(units)
            else:
                self.fired_spans.append(None)
        with tf.init_scope():
            self.steps = tf.Variable(unused_slot_steps(self.slots),
                                     trainable=False, name="stability_probe_table_steps")
            self.rows = tf.Variable(tf.zeros([self.slots, len(self.probes), len(COLUMNS)],
                                             tf.float64),
                                    trainable=False, name="stability_probe_table")
            self.fired = tf.Variable(tf.zeros([self.slots, offset], tf.float32), trainable=False,
                                     name="stability_probe_table_fired") if offset else None

    @staticmethod
    def key(entries: Sequence[tuple[Probe, int]], slots: int) -> tuple:
        """What identifies a table: its probes (by identity and kind), their units, the slots."""
        return (int(slots),) + tuple((id(p), p.kind, int(u)) for p, u in entries)

    def reset(self) -> None:
        """Marks every slot unused (eager, host side)."""
        self.steps.assign(unused_slot_steps(self.slots))

    def write(self, step: Any, slot: Any, rows: Sequence[tf.Tensor],
              fired: Sequence[Optional[tf.Tensor]]) -> None:
        """Sets ``slot`` to one step's rows (graph side; the rows' step column is ignored)."""
        tf.raw_ops.ResourceScatterUpdate(resource=self.steps.handle, indices=slot,
                                         updates=tf.cast(step, tf.int64))
        tf.raw_ops.ResourceScatterUpdate(resource=self.rows.handle, indices=slot,
                                         updates=tf.stack(list(rows)))
        if self.fired is not None:
            parts = [f for f, span in zip(fired, self.fired_spans) if span is not None]
            tf.raw_ops.ResourceScatterUpdate(resource=self.fired.handle, indices=slot,
                                             updates=tf.concat(parts, 0))

    def variables(self) -> list:
        """The variables the host reads."""
        return [v for v in (self.steps, self.rows, self.fired) if v is not None]

    def values(self, batch=None) -> list[tuple[Probe, list[tuple[int, dict]]]]:
        """Host side: ``(probe, probe.values_of(...))`` for every probe of the table."""
        steps = readback.fetch(self.steps, batch).astype(np.float64)
        rows = readback.fetch(self.rows, batch)
        fired = readback.fetch(self.fired, batch) if self.fired is not None else None
        out = []
        for index, (probe, span) in enumerate(zip(self.probes, self.fired_spans)):
            stats = np.array(rows[:, index, :], np.float64)
            stats[:, STEP] = steps
            own = fired[:, span[0]:span[1]] if span is not None and fired is not None else None
            out.append((probe, probe.values_of(stats, own)))
        return out
