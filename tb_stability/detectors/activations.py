"""dead_units and saturated_activations, from the activation probes.

Signals: per-layer ``dead_fraction`` (share of units that never fired on the
probe batch) and ``saturated_fraction`` (share of sigmoid/tanh
pre-activations with ``|x| >= 5``), one record every N steps.

Rule: over the second half of the records (at least one), a layer whose
median fraction is >= ``DEAD`` (0.7, DeepDiagnosis/AUTOTRAINER) is dead; >
``SATURATED`` (0.5) is saturated. Onset: first record of the final stretch
where the layer stays above the threshold.

Severity: ``warning``; dead_units is ``critical`` when a layer is >= 0.99
dead (the layer passes no signal and no gradient: training is broken).
"""

from __future__ import annotations

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.detectors import _layer_kinds as K
from tb_stability.detectors import _remedies as remedies
from tb_stability.detectors import _robust as R
from tb_stability.detectors import _zero_init
from tb_stability.detectors import data, gradients
from tb_stability.findings import Finding
from tb_stability.rundata import Matrix, RunData

DEAD = 0.7
ALL_DEAD = 0.99
SATURATED = 0.5


def persistent_layers(values, threshold: float, strict: bool = False) -> list[tuple[int, int, float]]:
    """Columns whose median over the second half of rows crosses ``threshold``.

    Returns:
      ``(column, onset_row, median)`` triples; onset_row starts the final run of
      rows at or above (above when ``strict``) the threshold.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or not v.shape[0]:
        return []
    tail = v[v.shape[0] // 2:]
    out = []
    for j in range(v.shape[1]):
        med = R.median(tail[:, j])
        hit = med > threshold if strict else med >= threshold
        if not np.isfinite(med) or not hit:
            continue
        above = v[:, j] > threshold if strict else v[:, j] >= threshold
        runs = R.true_runs(above)
        onset = runs[-1][0] if runs else v.shape[0] // 2
        out.append((j, onset, med))
    return out


def _finding(run: RunData, m: Matrix, hits, kind: str, severity: str, threshold: str,
             explanation: str, remedy: str, extra: dict | None = None) -> Finding:
    onset = min(h[1] for h in hits)
    return Finding(
        kind=kind,
        severity=severity,
        run=run.name,
        first_step=int(m.steps[onset]),
        last_step=int(m.steps[-1]),
        layers=[m.names[j] for j, _, _ in hits],
        evidence={"median_fraction_second_half": {m.names[j]: float(med) for j, _, med in hits},
                  **(extra or {}), "threshold": threshold},
        explanation=explanation,
        remedy=remedy,
    )


def detect_dead(run: RunData) -> list[Finding]:
    """dead_units adapter."""
    m = run.layers.get("dead_fraction")
    if m is None or not len(m):
        return []
    hits = persistent_layers(m.values, DEAD)
    if not hits:
        return []
    worst = max(h[2] for h in hits)
    names = ", ".join(m.names[j] for j, _, _ in hits[:4])
    explanation = (f"Up to {worst:.0%} of the units in {names} never activate, so they pass no "
                   "signal and receive no gradient.")
    remedy = (f"In {names}: lower the learning rate, use He initialisation and a leaky activation:\n"
              "    keras.layers.Dense(64, kernel_initializer='he_normal')\n"
              "    keras.layers.LeakyReLU(negative_slope=0.1)  # or activation='gelu'\n"
              f"    optimizer = {remedies.lowered_optimizer_call(run, 10.0)}")
    all_zeros = _zero_init.zero_kernels(run)
    zeros = [k for j, _, _ in hits for k in all_zeros if C.names_layer(k, m.names[j])]
    if zeros:  # dead from the start because nothing was ever initialised: no rate helps
        explanation += " " + _zero_init.explanation(zeros)
        remedy = _zero_init.remedy(zeros, relu=True)
    return [_finding(
        run, m, hits, "dead_units", "critical" if worst >= ALL_DEAD else "warning",
        f"median dead fraction over the second half >= {DEAD:g}; critical >= {ALL_DEAD:g}",
        explanation, remedy, {"zero_kernels": zeros} if zeros else None,
    )]


def detect_saturated(run: RunData) -> list[Finding]:
    """saturated_activations adapter."""
    m = run.layers.get("saturated_fraction")
    if m is None or not len(m):
        return []
    hits = persistent_layers(m.values, SATURATED, strict=True)
    if not hits:
        return []
    worst = max(h[2] for h in hits)
    names = ", ".join(m.names[j] for j, _, _ in hits[:4])
    from_start = _saturated_from_start(run, m, hits)
    explanation = (f"{worst:.0%} of the sigmoid/tanh inputs in {names} sit at |x| >= 5, where the "
                   "derivative is ~0, so gradients vanish through them.")
    if from_start:
        explanation += (f" {_listed(from_start)} already did at step {int(m.steps[0])}, before "
                        "any update, with the inputs in range: the weights the model started "
                        "with are too large for the activation.")
    at_first = {name: float(m.values[0][m.names.index(name)]) for name in from_start}
    return [_finding(
        run, m, hits, "saturated_activations", "warning",
        f"median saturated fraction (|pre-activation| >= 5) over the second half > {SATURATED:g}",
        explanation, saturated_remedy(run, [m.names[j] for j, _, _ in hits], from_start),
        {"saturated_at_first_step": at_first} if at_first else None,
    )]


def _listed(names: list[str]) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def _saturated_from_start(run: RunData, m: Matrix, hits) -> list[str]:
    """The feed-forward layers of ``hits`` saturated at the run's first step with inputs in range.

    Before any update the weights are the initial ones, so where the recorded
    inputs are in range (unscaled_inputs has nothing to say) a layer saturated
    at once was saturated by its initial weights. Empty without input statistics
    or where the first record is not at the run's first step.
    """
    loss, _ = C.loss_series(run)
    if not run.inputs or loss is None or int(m.steps[0]) > int(loss.steps[0]):
        return []
    if data.detect_unscaled(run):
        return []
    table = K.layer_activations(run)
    first = m.values[0]
    return [m.names[j] for j, _, _ in hits
            if np.isfinite(first[j]) and first[j] > SATURATED
            and not K.recurrent_class(m.names[j], K.describe_named(table, m.names[j]))]


def saturated_remedy(run: RunData, layers: list[str], from_start: list[str] = ()) -> str:
    """The fix for saturated ``layers``: recurrent cells and feed-forward layers differ.

    A recurrent layer (run_info's recorded class, else Keras' layer names) is
    never told to switch to ReLU: one whose recurrence uses another activation
    than Keras' ``tanh`` is told to use ``tanh``; a ``tanh`` cell pinned at
    +-1 has too large inputs or weights (scale, normalise, lower the learning
    rate with clipping). Feed-forward layers: normalise before the activation
    or switch to ReLU.
    """
    table = K.layer_activations(run)
    recurrent, other = [], []
    for name in layers:
        entry = K.describe_named(table, name)
        kind = K.recurrent_class(name, entry)
        (recurrent if kind else other).append((name, entry or {}, kind))
    lines = []
    if recurrent:
        listed = ", ".join(name for name, _, _ in recurrent[:4])
        _, entry, kind = recurrent[0]
        units = entry.get("units") if isinstance(entry.get("units"), int) else 32
        activation = entry.get("activation")
        if activation and activation != "tanh":
            lines += [f"In {listed}: the recurrence uses activation='{activation}'. Use Keras' "
                      "default activation='tanh' (zero-centred, with a derivative of 1 at 0):",
                      f"    keras.layers.{kind}({units})  # activation='tanh', the default"]
        else:
            clip = gradients.remedy_settings(run).clipnorm or 1.0
            lines += [f"In {listed}: the {kind} cell's inputs are so large that its tanh is "
                      "pinned at +-1. Scale the inputs, normalise before and between recurrent "
                      "layers, and if the weights grew during training, lower the learning rate "
                      "and clip the gradient norm:",
                      "    x = keras.layers.LayerNormalization()(x)  # before and between "
                      "recurrent layers",
                      f"    optimizer = {remedies.lowered_optimizer_call(run, 10.0, f'clipnorm={clip:g}')}"]
    initial = [item for item in other if item[0] in from_start]
    if initial:
        listed = ", ".join(name for name, _, _ in initial[:4])
        entry = initial[0][1]
        units = entry.get("units") if isinstance(entry.get("units"), int) else 64
        activation = entry.get("activation") if isinstance(entry.get("activation"), str) else "tanh"
        lines += [f"In {listed}: start from smaller weights. Keras' default initialiser "
                  "(glorot_uniform) scales each kernel to its fan-in and fan-out; a "
                  "kernel_initializer with a fixed stddev (RandomNormal(stddev=1)) is far too "
                  "wide for a layer of many inputs:",
                  f"    keras.layers.Dense({units}, activation='{activation}')  # "
                  "kernel_initializer='glorot_uniform', the default",
                  "    x = keras.layers.BatchNormalization()(x)  # or normalise before the activation"]
    other = [item for item in other if item[0] not in from_start]
    if other:
        listed = ", ".join(name for name, _, _ in other[:4])
        lines += [f"In {listed}: scale the inputs, normalise before the activation, or switch "
                  "to ReLU:",
                  "    x = keras.layers.BatchNormalization()(x)",
                  "    x = keras.layers.Activation('tanh')(x)   # or activation='relu'"]
    return "\n".join(lines)
