"""Findings that are consequences of another finding of the same run, marked as such.

Once a run has gone wrong in one way, other rules fire on what that did to it:
a NaN makes every later statistic garbage, a layer of dead units passes no
gradient back, a bad batch that recurs every epoch throws the model back, and
a loss that blew up in its first steps leaves the weights far from anywhere
useful. Those findings stay in the report, as ``info``, with the cause named
in ``evidence["consequence_of"]`` (or ``after_nan_step``) and its remedy
first, so a user fixes the cause and not its symptoms.
"""

from __future__ import annotations

from tb_stability.detectors._common import names_layer
from tb_stability.findings import Finding


def mark_all(findings: list[Finding]) -> list[Finding]:
    """Every rule below, causes first: NaN, a blow-up, exploding gradients, a degenerate
    BatchNorm, tiny inputs, dead units, zero kernels, saturation, then a bad batch."""
    findings = mark_consequences_of_blowup(mark_consequences_of_nan(findings))
    findings = mark_consequences_of_explosion(findings)
    findings = mark_consequences_of_tiny_inputs(mark_consequences_of_degenerate_batch_norm(findings))
    findings = mark_consequences_of_zero_kernels(mark_consequences_of_dead_units(findings))
    return mark_consequences_of_bad_batch(mark_consequences_of_saturation(findings))


def mark_consequences_of_nan(findings: list[Finding]) -> list[Finding]:
    """Downgrades findings that begin at or after the first NaN to ``info``.

    Once weights or activations are NaN every statistic is garbage (a NaN
    activation is never positive, so a ReLU layer reads as dead, predictions
    collapse to one class, ...). Those findings are consequences, not causes:
    they stay in the report, as ``info``, with ``evidence["after_nan_step"]``.
    """
    onsets = [f.first_step for f in findings
              if f.kind == "nan_inf" and f.severity == "critical" and f.first_step is not None]
    if not onsets:
        return findings
    onset = min(onsets)
    for finding in findings:
        if finding.kind == "nan_inf" or finding.first_step is None or finding.first_step < onset:
            continue
        if finding.severity != "info":
            finding.severity = "info"
            finding.evidence["after_nan_step"] = onset
            finding.explanation = (
                f"After the first non-finite value (step {onset}), so most likely a consequence "
                f"of it: {finding.explanation}"
            )
    return findings


BLOWUP_CONSEQUENCES = frozenset({"dead_units", "vanishing_gradients", "saturated_activations",
                                 "stalled", "update_ratio_low", "class_imbalance", "oscillation"})


def mark_consequences_of_blowup(findings: list[Finding]) -> list[Finding]:
    """Downgrades what a loss that blew up and never recovered explains to ``info``.

    A critical ``divergence`` from an early blow-up (``early_blowup`` stuck or
    diverged) means the first updates threw the weights far out: ReLU units
    die, tanh and sigmoid units saturate, gradients to the early layers vanish,
    the predictions collapse to one class and the loss stops improving. Each of
    those rules names its own fix (He initialisation, residual connections,
    class weights, a higher learning rate) and none of them cures a learning
    rate too large for the freshly initialised model. So the findings of
    `BLOWUP_CONSEQUENCES` that begin at or after the blow-up's onset stay, as
    ``info`` with ``evidence["consequence_of"] = "divergence"`` and the
    blow-up's remedy first. Not: a saturation already present at the first
    step (the initial weights: a cause of its own), and an imbalance of the
    labels themselves (only the predictions' collapse is a consequence).
    """
    blowups = [f for f in findings if f.kind == "divergence" and f.severity == "critical"
               and f.evidence.get("early_blowup") in ("stuck", "diverged") and f.first_step is not None]
    _demote_from_earliest(findings, blowups,
                          "After the loss blew up at step {step} and never recovered (the first "
                          "updates threw the weights far out), so most likely a consequence of it",
                          "Fix the blow-up first", "blowup_step")
    return findings


def mark_consequences_of_explosion(findings: list[Finding]) -> list[Finding]:
    """Downgrades what a critical gradient explosion explains to ``info``.

    Gradients that grew far past their baseline (a critical
    ``exploding_gradients``) threw the weights out with the update they made:
    ReLU units die and tanh units saturate at that very step, which a NaN a
    step later (`mark_consequences_of_nan`) does not cover. The findings of
    `BLOWUP_CONSEQUENCES` that begin at or after the explosion's onset stay, as
    ``info`` with ``evidence["consequence_of"] = "exploding_gradients"`` and
    its remedy first. Not a saturation present at the first step.
    """
    explosions = [f for f in findings if f.kind == "exploding_gradients"
                  and f.severity == "critical" and f.first_step is not None]
    _demote_from_earliest(findings, explosions,
                          "After the gradients exploded at step {step} (the update they made "
                          "threw the weights far out), so most likely a consequence of it",
                          "Fix the exploding gradients first", "explosion_step")
    return findings


def _demote_from_earliest(findings: list[Finding], causes: list[Finding], because: str,
                          first: str, step_key: str) -> None:
    """Demotes the `BLOWUP_CONSEQUENCES` that begin at or after the earliest of ``causes`` (not
    a saturation already present at the first step) to its consequences.

    Args:
      because: Why, with ``{step}`` for the cause's first step.
      step_key: The evidence key that records that step.
    """
    if not causes:
        return
    cause = min(causes, key=lambda f: f.first_step)
    onset = cause.first_step
    for finding in findings:
        if (_demotable(finding, BLOWUP_CONSEQUENCES) and finding.first_step is not None
                and finding.first_step >= onset
                and not finding.evidence.get("saturated_at_first_step")):
            _demote(finding, cause.kind, because.format(step=onset), first, cause.remedy,
                    **{step_key: onset})


def mark_consequences_of_degenerate_batch_norm(findings: list[Finding]) -> list[Finding]:
    """Downgrades what a BatchNorm over one value per feature explains to ``info``.

    A BatchNormalization layer that sees one value per feature (batch size 1
    after a Dense layer; a critical ``config_mismatch`` problem with
    ``batch_norm_values == 1``) outputs its offset whatever the input: a ReLU
    after it is dead, the layers before it get no gradient, the predictions
    are one constant and the loss stops improving. The dead-unit,
    vanishing-gradient and stalled rules name fixes (He initialisation, a
    higher learning rate) that cure none of it, so the findings of
    `BLOWUP_CONSEQUENCES` stay, as ``info`` with ``evidence["consequence_of"] =
    "config_mismatch"`` and the batch-size remedy first. Not an imbalance of
    the labels themselves.
    """
    problem = next((p for cause in findings
                    if cause.kind == "config_mismatch" and cause.severity == "critical"
                    for p in cause.evidence.get("problems") or []
                    if isinstance(p, dict) and p.get("batch_norm_values") == 1), None)
    if problem is None:
        return findings
    for finding in findings:
        if _demotable(finding, BLOWUP_CONSEQUENCES):
            _demote(finding, "config_mismatch",
                    f"Most likely a consequence of BatchNormalization '{problem.get('layer')}' "
                    "seeing one value per feature (it outputs a constant)",
                    "Fix the batch size first", str(problem.get("remedy", "")),
                    degenerate_layer=problem.get("layer"))
    return findings


def mark_consequences_of_tiny_inputs(findings: list[Finding]) -> list[Finding]:
    """Downgrades what inputs far below unit scale explain to ``info``.

    Inputs within 0.01 of 0 (``unscaled_inputs`` with ``tiny``: often scaled
    twice) leave the first layer's outputs at its biases: ReLU units that
    never fire, a loss at the labels' entropy, predictions of one class. The
    dead-unit, stalled and collapse rules name fixes (He initialisation, a
    higher rate, checking the labels) that cure none of it, so the findings of
    `BLOWUP_CONSEQUENCES` but saturation stay, as ``info`` with
    ``evidence["consequence_of"] = "unscaled_inputs"`` and the scaling fix
    first. Not an imbalance of the labels themselves.
    """
    cause = next((f for f in findings if f.kind == "unscaled_inputs" and f.severity != "info"
                  and f.evidence.get("tiny")), None)
    if cause is None:
        return findings
    for finding in findings:
        if _demotable(finding, BLOWUP_CONSEQUENCES - {"saturated_activations"}):
            _demote(finding, "unscaled_inputs",
                    "Most likely a consequence of inputs far below unit scale (the first layer "
                    "sees almost nothing but its biases)", "Fix the input scale first", cause.remedy)
    return findings


def mark_consequences_of_dead_units(findings: list[Finding]) -> list[Finding]:
    """Downgrades what a layer of dead units explains to ``info``.

    A layer whose units never fire (``dead_units`` at >= 99 %) passes no
    signal forward and no gradient back: its own weights and every layer
    before it get none (which the vanishing-gradient rule flags) and the loss
    stops improving (which the stalled rule flags, with a "raise the learning
    rate" fix that would make it worse). The cure is the dead layer's, so those
    findings stay, as ``info`` with ``evidence["consequence_of"] =
    "dead_units"``, the dead layers named and the dead-units remedy first.
    Vanishing gradients only when every flagged layer is a dead one or comes
    before one (in that finding's model order); both only when their steps
    overlap the dead stretch.
    """
    from tb_stability.detectors.activations import ALL_DEAD

    dead_findings = [f for f in findings if f.kind == "dead_units" and f.severity != "info"]
    for finding in findings:
        if finding.kind not in ("vanishing_gradients", "stalled") or finding.severity == "info":
            continue
        for dead in dead_findings:
            fractions = dead.evidence.get("median_fraction_second_half") or {}
            names = [name for name, value in fractions.items()
                     if isinstance(value, (int, float)) and value >= ALL_DEAD]
            if names and _overlap(dead, finding) and (
                    finding.kind == "stalled" or _before_dead_layers(finding, names)):
                _mark_consequence(finding, dead, names)
                break
    return findings


def mark_consequences_of_zero_kernels(findings: list[Finding]) -> list[Finding]:
    """Downgrades what kernels initialised to zero explain to ``info``.

    A model whose kernels are all 0 (``update_ratio_low`` naming
    ``zero_kernels``, see `detectors._zero_init`) passes no gradient to any of
    them: the loss stalls and the predictions collapse to one class, and the
    stalled rule's "raise the learning rate" or the collapse's "check the
    labels" cures nothing. Those findings (and vanishing gradients) stay, as
    ``info`` with ``evidence["consequence_of"] = "update_ratio_low"`` and the
    initialiser fix first.
    """
    cause = next((f for f in findings if f.kind == "update_ratio_low" and f.severity != "info"
                  and f.evidence.get("zero_kernels")), None)
    if cause is None:
        return findings
    for finding in findings:
        if _demotable(finding, ("stalled", "vanishing_gradients", "class_imbalance")):
            _demote(finding, "update_ratio_low",
                    "A consequence of kernels initialised to zero (no weight behind or after them "
                    "gets a gradient)", "Fix the initialisation first", cause.remedy,
                    zero_kernels=cause.evidence["zero_kernels"])
    return findings


def mark_consequences_of_saturation(findings: list[Finding]) -> list[Finding]:
    """Downgrades kernels without any gradient inside saturated layers to ``info``.

    A sigmoid or tanh pinned far out (a GRU fed raw values in the thousands)
    has a derivative of exactly 0 in float32, so its kernels get a gradient of
    exactly 0: ``update_ratio_low`` then calls them not connected to the loss.
    Where every kernel it names that way belongs to a layer a
    ``saturated_activations`` finding names (and it names no kernel that moves
    too little), it stays, as ``info`` with ``evidence["consequence_of"] =
    "saturated_activations"`` and the saturation's fix first; so does the
    stalled loss beside it, whose "raise the learning rate" cures nothing.
    """
    saturated = [f for f in findings if f.kind == "saturated_activations" and f.severity != "info"]
    for finding in findings:
        zero = finding.evidence.get("no_gradient") or []
        if (finding.kind != "update_ratio_low" or finding.severity == "info" or not zero
                or "median_ratio" in finding.evidence):
            continue
        cause = next((s for s in saturated
                      if all(any(names_layer(kernel, layer) for layer in s.layers)
                             for kernel in zero)), None)
        if cause is None:
            continue
        listed = ", ".join(cause.layers[:4])
        for stuck in [finding] + [f for f in findings if f.kind == "stalled" and f.severity != "info"]:
            _demote(stuck, "saturated_activations",
                    f"A consequence of the saturated units in {listed} (an activation pinned at its "
                    "limit has a derivative of exactly 0, so the kernels feeding it get none)",
                    f"Fix the saturation in {listed} first", cause.remedy,
                    saturated_layers=list(cause.layers))
    return findings


def mark_consequences_of_bad_batch(findings: list[Finding]) -> list[Finding]:
    """Downgrades a stalled or diverging loss beside a bad batch that recurs every epoch.

    A batch that comes back at the same place every epoch with a loss far
    above the others' (``loss_spike`` naming its ``batch_in_epoch``: outliers
    or wrong labels in unshuffled data) throws the model back at every epoch,
    so the other batches' loss stops improving or rises: the stalled and
    divergence rules flag that, with learning-rate fixes that cure nothing.
    Those findings stay, as ``info`` with ``evidence["consequence_of"] =
    "loss_spike"`` and the bad batch's remedy first, where their steps overlap
    the spikes'. Critical ones (a loss that went 10x up or non-finite) stay.
    """
    bad = [f for f in findings if f.kind == "loss_spike" and f.severity == "warning"
           and f.evidence.get("batch_in_epoch")]
    for finding in findings:
        if finding.kind not in ("stalled", "divergence") or finding.severity != "warning":
            continue
        spike = next((b for b in bad if _overlap(b, finding)), None)
        if spike is None:
            continue
        position = f"batch {spike.evidence['batch_in_epoch']} of {spike.evidence['batches_per_epoch']}"
        _demote(finding, "loss_spike",
                f"Most likely a consequence of the bad {position} in every epoch (its loss "
                f"{_spike_ratio(spike)} the others'; each of its updates throws the model back)",
                "Fix the bad batch first", spike.remedy,
                bad_batch_in_epoch=spike.evidence["batch_in_epoch"])
    return findings


def _spike_ratio(spike: Finding) -> str:
    """How far a loss_spike finding's worst spike stood above its median, in words."""
    points = spike.evidence.get("spikes") or []
    ratios = [p.get("ratio_to_median") for p in points if isinstance(p, dict)]
    ratios = [r for r in ratios if isinstance(r, (int, float))]
    return f"reaching {max(ratios):.3g}x" if ratios else "far above"


def _before_dead_layers(vanishing: Finding, dead_names: list[str]) -> bool:
    order = list((vanishing.evidence.get("median_grad_norm_by_layer") or {}).keys())
    positions = [i for i, layer in enumerate(order)
                 if any(names_layer(layer, name) for name in dead_names)]
    flagged = [order.index(layer) for layer in vanishing.layers if layer in order]
    return bool(positions and flagged) and max(flagged) <= max(positions)


def _mark_consequence(finding: Finding, dead: Finding, names: list[str]) -> None:
    listed = ", ".join(names[:4])
    _demote(finding, "dead_units",
            f"A consequence of the dead units in {listed} (a layer whose units never fire passes "
            "no signal forward and no gradient back)",
            f"Fix the dead units in {listed} first", dead.remedy, dead_layers=names)


def _demotable(finding: Finding, kinds) -> bool:
    """Whether ``finding`` is of ``kinds`` and not ``info`` yet; a ``class_imbalance`` only
    where the predictions collapsed (the labels' own imbalance is a cause, never a consequence)."""
    return (finding.kind in kinds and finding.severity != "info"
            and (finding.kind != "class_imbalance" or "prediction_share" in finding.evidence))


def _demote(finding: Finding, cause: str, because: str, first: str, remedy: str, **evidence) -> None:
    """Marks ``finding`` as a consequence of a ``cause`` finding: ``info``, why, the cause's fix first."""
    finding.severity = "info"
    finding.evidence["consequence_of"] = cause
    finding.evidence.update(evidence)
    finding.explanation = f"{because}: {finding.explanation}"
    finding.remedy = f"{first}:\n{remedy}"


def _overlap(a: Finding, b: Finding) -> bool:
    if None in (a.first_step, a.last_step, b.first_step, b.last_step):
        return True
    return a.first_step <= b.last_step and b.first_step <= a.last_step
