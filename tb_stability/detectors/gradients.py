"""exploding_gradients and vanishing_gradients.

exploding_gradients
  Signal: the per-step global gradient norm (else one rebuilt from the
  per-variable norms). Baseline: median of the first ``clip(n // 10, 5, 100)``
  finite values (the early, healthy level). Rule: the trailing median of 5
  steps (so a single spike does not count) reaches ``GROWTH_THRESHOLD`` (50x)
  the baseline. Onset (first_step) is the start of the stretch, ending at the
  crossing, where the smoothed norm is above 2x the baseline. Layers: the
  variables whose own norm grew >= ``GROWTH_THRESHOLD``x (else the 3 that grew
  most), in model order. Severity: ``critical``. (AUTOTRAINER's published
  rule is a first/last-layer ratio > 70 or any non-finite gradient; non-finite
  gradients are reported as nan_inf, and 50x growth over the run's own early
  level is the measured rule here.)

vanishing_gradients
  Signal: per-layer gradient norms (root sum of squares of the per-variable
  norms sharing a layer path, e.g. ``sequential/dense/{kernel,bias}``), first
  and last layer in model order. Rule (AUTOTRAINER): ``|g_first| / |g_last| <
  1e-3`` and ``|g_first| < 1e-4`` in at least half of the records. Layers:
  every layer whose median norm is below 1e-3 of the last layer's. Severity: ``warning`` (training is slow or
  stuck in early layers, not broken). Variables whose gradient is exactly 0
  in every record (`_common.no_gradient_variables`: not connected to the
  loss) are left out: they are update_ratio_low's "no gradient" case, not an
  attenuation through depth. Remedy: where run_info records the
  layers' activations (``layer_activations``), the flagged layers' activation
  is named in the evidence and the remedy; recurrent layers (recorded class,
  else Keras' ``lstm``/``gru``/``simple_rnn`` names) get a recurrent fix
  (`_layer_kinds.recurrent_remedy`), others a feed-forward one.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from tb_stability.detectors import _common as C
from tb_stability.detectors import _remedies as remedies
from tb_stability.detectors import _layer_kinds as K
from tb_stability.detectors import _robust as R
from tb_stability.detectors import _update_ratios as U
from tb_stability.detectors import _weight_collapse as collapse
from tb_stability.findings import Finding
from tb_stability.rundata import RunData

GROWTH_THRESHOLD = 50.0
DEPARTURE = 2.0
SMOOTH = 5
VANISH_RATIO = 1e-3
VANISH_ABS = 1e-4
VANISH_MAJORITY = 0.5
NONFINITE_LOOKBACK = 20  # finite steps before a first NaN/Inf that may already be blowing up


def level_before_nonfinite(finite_before, lookback: int = NONFINITE_LOOKBACK) -> float:
    """Healthy level of a series before its first non-finite value.

    The median of the finite values before it, less the last ``lookback``
    (which may already be growing towards the overflow), keeping at least the
    first. NaN where there is none.
    """
    before = np.asarray(finite_before, dtype=np.float64)
    if not before.size:
        return float("nan")
    return float(np.median(before[: max(1, before.size - lookback)]))


def baseline_count(n: int) -> int:
    """Number of early finite values forming the baseline."""
    return int(min(100, max(5, n // 10)))


def explosion(values, growth: float = GROWTH_THRESHOLD, smooth: int = SMOOTH) -> dict | None:
    """Finds a sustained explosion of a positive series.

    Non-finite values are dropped first; indices returned refer to the finite
    subsequence's positions in the *original* array.

    Args:
      values: Gradient norms in step order.
      growth: Threshold on smoothed value / baseline.
      smooth: Trailing-median length.

    Returns:
      None, or a dict with ``baseline``, ``onset`` (index where the smoothed
      value starts its final climb above ``DEPARTURE`` x baseline), ``cross``
      (first index reaching the threshold), ``peak`` (max finite value) and
      ``peak_index``.
    """
    x = np.asarray(values, dtype=np.float64)
    idx = np.flatnonzero(np.isfinite(x))
    nb = baseline_count(idx.size)
    if idx.size < nb + smooth:
        return None
    f = x[idx]
    base = float(np.median(f[:nb]))
    if not base > 0:
        return None
    sm = R.rolling_median(f, smooth)
    sm[: smooth - 1] = np.nan  # need a full window
    cross = R.first_index(sm >= growth * base)
    if cross is None:
        return None
    above = sm[: cross + 1] > DEPARTURE * base
    onset = cross
    while onset > 0 and above[onset - 1]:
        onset -= 1
    onset = max(0, onset - (smooth // 2))  # the median lags by ~half a window
    pk = int(np.argmax(f))
    return {
        "baseline": base,
        "onset": int(idx[onset]),
        "cross": int(idx[cross]),
        "peak": float(f[pk]),
        "peak_index": int(idx[pk]),
        "growth": float(f[pk] / base),
    }


class RemedySettings(NamedTuple):
    """The clipping and learning-rate change every remedy of one run suggests.

    Attributes:
      healthy_norm: Typical global gradient norm of the healthy stretch: the
        median of the finite norms before an explosion's onset, before the
        first non-finite norm less the 20 steps just before it
        (`level_before_nonfinite`, as the nan_inf evidence), or of all of them
        in a run without either; None without a positive, finite norm.
      clipnorm: Twice ``healthy_norm`` (None without one).
      lr_factor: How many times lower a learning rate to suggest: where the
        gradient norm explodes, the kernels' update ratio at the crossing over
        1e-3 (healthy), within [2, 100]; where it turns non-finite without an
        explosion, the same at the last finite record before; where neither
        happens but kernels' update ratios are too high (update_ratio_high),
        the cut that finding measures (`_update_ratios.high_ratios`);
        otherwise 10.
      measured_at: The step whose update ratio gave ``lr_factor``; None where
        it is the default 10.
    """

    healthy_norm: float | None
    clipnorm: float | None
    lr_factor: float
    measured_at: int | None = None


def remedy_settings(run: RunData) -> RemedySettings:
    """`RemedySettings` of ``run``, from one scan for an explosion.

    The exploding-gradient, divergence, NaN, update-ratio, spike and vanishing
    remedies of one run all use it, so they give the same numbers.
    """
    g = C.global_grad_norm(run)
    if g is None:
        return RemedySettings(None, None, *_high_update_factor(run))
    x = np.asarray(g.values, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(x))
    ex = explosion(x)
    end = min([x.size] + ([int(bad[0])] if bad.size else []) + ([ex["onset"]] if ex else []))
    if not end:
        level = ex["baseline"] if ex is not None else None
    elif bad.size and int(bad[0]) == end:  # up to a NaN: the steps just before may be exploding
        level = level_before_nonfinite(x[:end])
    else:
        level = float(np.median(x[:end]))
    if level is None or not (np.isfinite(level) and level > 0):
        level = None
    factor, measured_at = 10.0, None
    if ex is not None:
        factor, measured_at = _lr_factor_at(run, int(g.steps[ex["cross"]]))
    elif bad.size:
        factor, measured_at = _lr_factor_at(run, int(g.steps[bad[0]]))
    else:
        factor, measured_at = _high_update_factor(run)
    return RemedySettings(level, C.round_sig(2 * level) if level else None, factor, measured_at)


def _high_update_factor(run: RunData) -> tuple[float, int | None]:
    """``(cut, first step)`` of update_ratio_high (`_update_ratios.high_ratios`), else ``(10, None)``."""
    high = U.high_ratios(U.kernel_ratios(run))
    if high is None:
        return 10.0, None
    return max(2.0, high.cut), high.first_step


def _lr_factor_at(run: RunData, step: int) -> tuple[float, int | None]:
    """``(median kernel update ratio / 1e-3 in [2, 100], its step)`` at the last finite record <= ``step``.

    ``(10, None)`` where no record up to ``step`` has a finite ratio above 1e-3.
    """
    ur = run.variables.get("update_ratio")
    if ur is not None and len(ur):
        columns = list(C.weight_columns(ur))
        for row in np.flatnonzero(ur.steps <= step)[::-1]:
            med = R.median(ur.values[row][columns])
            if np.isfinite(med):
                if med > 1e-3:
                    return float(max(2.0, min(100.0, C.round_sig(med / 1e-3, 1)))), \
                        int(ur.steps[row])
                break
    return 10.0, None


def vanishing_mask(first, last, ratio: float = VANISH_RATIO, absolute: float = VANISH_ABS):
    """Per-record test ``|first|/|last| < ratio and |first| < absolute``."""
    first = np.abs(np.asarray(first, dtype=np.float64))
    last = np.abs(np.asarray(last, dtype=np.float64))
    ok = np.isfinite(first) & np.isfinite(last) & (last > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(ok, first / np.where(last > 0, last, 1.0), np.nan)
    return ok & (r < ratio) & (first < absolute), r


def detect_exploding(run: RunData) -> list[Finding]:
    """exploding_gradients adapter (see module docstring)."""
    g, signal = C.global_grad_norm_with_source(run)
    if g is None:
        return []
    ex = explosion(g.values)
    if ex is None:
        return []
    onset = int(g.steps[ex["onset"]])
    cross = int(g.steps[ex["cross"]])
    finite_steps = g.steps[np.isfinite(g.values)]
    last = int(finite_steps[-1])
    base = ex["baseline"]

    layers: list[str] = []
    per_layer = {}
    m = run.variables.get("grad_norm")
    if m is not None and len(m) >= 2:
        nb = max(1, min(len(m) // 4, 10))
        with np.errstate(divide="ignore", invalid="ignore"):
            b = np.nanmedian(np.where(np.isfinite(m.values[:nb]), m.values[:nb], np.nan), axis=0)
            rows = np.flatnonzero(m.steps >= cross)
            row = rows[0] if rows.size else len(m) - 1
            v = m.values[row]
            ratios = np.where(np.isfinite(v) & (b > 0), v / b, np.nan)
        order = [j for j in range(len(m.names)) if np.isfinite(ratios[j]) and ratios[j] >= GROWTH_THRESHOLD]
        if not order:
            top = np.argsort(np.nan_to_num(-ratios, nan=np.inf))[:3]
            order = sorted(int(j) for j in top if np.isfinite(ratios[j]))
        layers = [m.names[j] for j in order]
        per_layer = {m.names[j]: C.num(ratios[j]) for j in order}

    lr = C.lr_at(run, onset)
    settings = remedy_settings(run)  # the same explosion, so its factor is the one at `cross`
    factor = settings.lr_factor
    clip = settings.clipnorm or C.round_sig(2 * base)
    lr_line = (
        f"learning_rate={C.round_sig(lr / factor):g}, " if lr else ""
    )
    evidence = {
        "signal": signal,
        "baseline_grad_norm": base,
        "baseline_points": baseline_count(int(np.isfinite(g.values).sum())),
        "smoothed_over": SMOOTH,
        "threshold": f"smoothed grad norm >= {GROWTH_THRESHOLD:g}x baseline",
        "crossed_at_step": cross,
        "peak_grad_norm": ex["peak"],
        "peak_step": int(g.steps[ex["peak_index"]]),
        "growth": ex["growth"],
        "per_variable_growth": per_layer,
        "learning_rate": C.num(lr),
        "suggested_clipnorm": clip,
        "suggested_lr_factor": factor,
    }
    clipping = remedies.configured_clipping(run)
    if clipping:
        evidence["configured_clipping"] = clipping
    where = f" (largest in {', '.join(layers[:3])})" if layers else ""
    return [
        Finding(
            kind="exploding_gradients",
            severity="critical",
            run=run.name,
            first_step=onset,
            last_step=last,
            layers=layers,
            evidence=evidence,
            explanation=(
                f"The gradient norm grew from a baseline of {C.fmt(base)} to {C.fmt(ex['peak'])} "
                f"({C.fmt(ex['growth'])}x){where}, crossing {GROWTH_THRESHOLD:g}x at step {cross}. "
                "Updates this large throw the weights out of the region where the loss is well behaved."
            ),
            remedy=_remedy(run, clipping, factor, lr_line, clip),
        )
    ]


def _remedy(run: RunData, clipping: dict, factor: float, lr_line: str, clip: float) -> str:
    if clipping:
        setting = ", ".join(f"{k}={v:g}" for k, v in clipping.items())
        return (
            f"Gradients are already clipped ({setting}) and the pre-clip norm still grows, so "
            f"clipping only hides it: lower the learning rate {factor:g}x (or add warm-up):\n"
            f"    optimizer = {remedies.optimizer_call(run, lr_line + setting)}\n"
            "    model.compile(optimizer=optimizer, loss=...)\n"
            "Also check input scaling and weight initialisation if the growth starts at step 0."
        )
    return (
        f"Clip gradients at ~2x the healthy norm and lower the learning rate {factor:g}x:\n"
        f"    optimizer = {remedies.optimizer_call(run, f'{lr_line}clipnorm={clip:g}')}\n"
        "    model.compile(optimizer=optimizer, loss=...)\n"
        "Also check input scaling and weight initialisation if the growth starts at step 0."
    )


def layer_norms(names, values) -> tuple[list[str], np.ndarray]:
    """Per-layer gradient norms: the root sum of squares of a layer's variables.

    The layer of ``"sequential/dense/kernel"`` is ``"sequential/dense"``;
    layers keep the order of their first variable (model order).
    """
    layers: list[str] = []
    cols: dict[str, list[int]] = {}
    for j, n in enumerate(names):
        layer = n.rsplit("/", 1)[0] if "/" in n else n
        if layer not in cols:
            layers.append(layer)
            cols[layer] = []
        cols[layer].append(j)
    v = np.asarray(values, dtype=np.float64)
    out = np.stack([np.sqrt(np.sum(np.square(v[:, cols[l]]), axis=1)) for l in layers], axis=1)
    return layers, out


def detect_vanishing(run: RunData) -> list[Finding]:
    """vanishing_gradients adapter (see module docstring)."""
    m = run.variables.get("grad_norm")
    if m is None or not len(m):
        return []
    unconnected = C.no_gradient_variables(run)
    connected = [j for j, n in enumerate(m.names) if n not in unconnected]
    names, norms = layer_norms([m.names[j] for j in connected], m.values[:, connected])
    if len(names) < 2:
        return []
    mask, ratio = vanishing_mask(norms[:, 0], norms[:, -1])
    valid = np.isfinite(ratio)
    if not valid.any() or mask.sum() < VANISH_MAJORITY * valid.sum() or not mask.any():
        return []
    with np.errstate(divide="ignore", invalid="ignore"):
        med = np.nanmedian(np.where(np.isfinite(norms), norms, np.nan), axis=0)
    ref = med[-1]
    layers = [names[j] for j in range(len(names) - 1)
              if np.isfinite(med[j]) and ref > 0 and med[j] / ref < VANISH_RATIO]
    if names[0] not in layers:
        layers.insert(0, names[0])
    hits = np.flatnonzero(mask)
    evidence = {
        "first_layer": names[0],
        "last_layer": names[-1],
        "median_grad_norm_first": C.num(med[0]),
        "median_grad_norm_last": C.num(ref),
        "median_ratio_first_to_last": C.num(np.nanmedian(ratio[valid])),
        "records_flagged": int(mask.sum()),
        "records": int(valid.sum()),
        "median_grad_norm_by_layer": {names[j]: C.num(med[j]) for j in range(len(names))},
        "threshold": f"|g_first|/|g_last| < {VANISH_RATIO:g} and |g_first| < {VANISH_ABS:g} "
        f"in >= {VANISH_MAJORITY:.0%} of records (AUTOTRAINER; layer norm = root sum of "
        "squares of its variables' gradient norms)",
    }
    table = K.layer_activations(run)
    activations = K.activations_of(layers, table)
    if activations:
        evidence["layer_activations"] = activations
    listed = ", ".join(layers[:4])
    explanation = (f"Gradients reaching {listed} are "
                   f"{C.fmt(evidence['median_ratio_first_to_last'])}x those of {names[-1]}, so the "
                   "early layers barely learn.")
    collapsed = collapse.collapsed_kernels(run, layers)
    if collapsed:
        evidence["collapsed_kernel_norms"] = {k: {"first": a, "last": b}
                                              for k, (a, b) in collapsed.items()}
        because, remedy = collapse.explain(run, collapsed)
        explanation += because
    else:
        remedy = (K.recurrent_remedy(layers, table, remedies.kept_optimizer_call(
            run, f"clipnorm={remedy_settings(run).clipnorm or 1.0:g}"))
            or _feedforward_remedy(listed, activations))
    return [
        Finding(
            kind="vanishing_gradients",
            severity="warning",
            run=run.name,
            first_step=int(m.steps[hits[0]]),
            last_step=int(m.steps[hits[-1]]),
            layers=layers,
            evidence=evidence,
            explanation=explanation,
            remedy=remedy,
        )
    ]


def _feedforward_remedy(listed: str, activations: dict) -> str:
    used = sorted({a for a in activations.values() if a not in ("relu", "linear", "")})
    named = (f" (now activation={', '.join(repr(a) for a in used)})" if used else "")
    return (
        f"In {listed}{named}: use ReLU-family activations with He initialisation, add "
        "BatchNormalization, or add residual connections:\n"
        "    x = keras.layers.Dense(64, kernel_initializer='he_normal')(x)\n"
        "    x = keras.layers.BatchNormalization()(x)\n"
        "    x = keras.layers.Activation('relu')(x)\n"
        "    x = keras.layers.Add()([x, shortcut])  # residual path"
    )
