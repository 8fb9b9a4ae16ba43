"""`tf.distribute` support: aggregated statistics, replica flags, chief-only writing.

Where Keras 3 (TensorFlow backend) aggregates: ``optimizer.apply`` runs in
*replica context* on each replica's local gradients (of the loss already
divided by the number of replicas); clipping (``clipnorm``/``global_clipnorm``)
is applied there, per replica, and the all-reduce (SUM) happens afterwards,
inside ``_backend_update_step``. So the gradients the instrumentation sees are
local and pre-clip.

To turn them into statistics of the whole step, each replica packs its small
statistics vector (loss, squared norm per variable, non-finite count, clipped
flag, ``2**replica_id`` if it saw a non-finite value) and the vector is summed
with **one** extra all-reduce of ``num_vars + 5`` floats. The all-reduce is
unconditional: every replica runs it at every step, whatever its values, so a
replica that goes NaN cannot desynchronise the collectives (no ``tf.cond``
around a collective depends on replica-local values).

Aggregated quantities (``R`` replicas, ``g_r`` replica r's gradient):

* ``loss``: sum of the replicas' recorded losses (Keras and
  ``tf.nn.compute_average_loss`` divide by ``R``, so this is the global mean).
* ``grad_norm`` (global and per variable): ``sqrt(R * sum_r |g_r|^2)``, the
  root-mean-square of the replicas' full-scale norms ``R |g_r|``. It equals the
  norm of the all-reduced gradient ``|sum_r g_r|`` when replicas agree and is
  an upper bound otherwise (the all-reduced gradient itself is only formed
  after clipping, inside Keras).
* ``nonfinite_grads``: total over replicas; ``nonfinite_replicas``: bit mask.
* ``clipped``: 1 when clipping fired on any replica.

Only the chief (task ``chief``, else ``worker`` 0) writes event files; other
workers write into a temporary directory that nobody reads.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

import tensorflow as tf

from instrumentation.stats import LocalStats

# Bits of the replica mask are exact in a float64 up to 2**53.
MAX_MASK_REPLICAS = 52


def replica_context() -> Optional[tuple[Any, int]]:
    """``(replica_context, num_replicas)`` inside a multi-replica step, else None."""
    if tf.distribute.in_cross_replica_context():
        return None
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        return None
    replicas = int(ctx.num_replicas_in_sync)
    return (ctx, replicas) if replicas > 1 else None


def num_replicas(strategy: Any = None) -> int:
    """Replicas in sync of ``strategy`` (default: the current strategy)."""
    strategy = strategy or tf.distribute.get_strategy()
    return int(getattr(strategy, "num_replicas_in_sync", 1) or 1)


def reduce_local_stats(
    ctx: Any, replicas: int, local: LocalStats, clipped: Any = None
) -> tuple[LocalStats, dict]:
    """Aggregates one replica's statistics over all replicas (one all-reduce).

    Args:
      ctx: The replica context.
      replicas: Number of replicas in sync.
      local: This replica's statistics.
      clipped: Optional scalar, 1 when this replica's clipping fired.

    Returns:
      ``(aggregated LocalStats, extras)`` with extras ``nonfinite_replicas``
      and ``clipped`` (when given).
    """
    n = int(local.sum_squares.shape[0])
    bad = tf.logical_or(
        tf.logical_not(tf.math.is_finite(tf.cast(local.total, tf.float64))),
        tf.logical_or(local.nonfinite > 0,
                      tf.logical_not(tf.math.is_finite(tf.cast(local.loss, tf.float64)))),
    )
    replica_id = tf.cast(ctx.replica_id_in_sync_group, tf.float64)
    bit = tf.where(
        replica_id < MAX_MASK_REPLICAS, tf.pow(tf.constant(2.0, tf.float64), replica_id),
        tf.constant(0.0, tf.float64),
    )
    vector = tf.concat([
        tf.reshape(tf.cast(local.loss, tf.float64), [1]),
        tf.cast(local.sum_squares, tf.float64),
        tf.reshape(tf.cast(local.total, tf.float64), [1]),
        tf.reshape(tf.cast(local.nonfinite, tf.float64), [1]),
        tf.reshape(tf.where(bad, bit, tf.constant(0.0, tf.float64)), [1]),
        tf.reshape(tf.cast(clipped if clipped is not None else 0.0, tf.float64), [1]),
    ], axis=0)
    summed = ctx.all_reduce(tf.distribute.ReduceOp.SUM, vector)
    scale = tf.constant(float(replicas), tf.float64)
    aggregated = LocalStats(
        loss=summed[0],
        sum_squares=tf.cast(scale * summed[1:1 + n], tf.float32),
        total=scale * summed[1 + n],
        nonfinite=summed[2 + n],
    )
    extras = {"nonfinite_replicas": summed[3 + n]}
    if clipped is not None:
        extras["clipped"] = tf.minimum(summed[4 + n], 1.0)
    return aggregated, extras


def is_chief(strategy: Any = None) -> bool:
    """Whether this process is the chief of a multi-worker strategy (True otherwise).

    The chief is task ``chief`` when the cluster has one, else ``worker`` 0.
    """
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if resolver is None or not task_type:
        return True
    task_id = int(getattr(resolver, "task_id", 0) or 0)
    if task_type == "chief":
        return True
    try:
        jobs = resolver.cluster_spec().as_dict()
    except Exception:  # noqa: BLE001 - be permissive, never break training
        jobs = {}
    if "chief" in jobs:
        return False
    return task_type == "worker" and task_id == 0


def writer_log_dir(log_dir: str, strategy: Any = None) -> str:
    """``log_dir`` on the chief; a fresh temporary directory on other workers."""
    if is_chief(strategy):
        return log_dir
    return tempfile.mkdtemp(prefix=f"tb_stability_worker{os.getpid()}_")


def clip_fired(optimizer: Any, local: LocalStats) -> Any:
    """1.0 when ``optimizer``'s clipnorm/global_clipnorm clips these gradients, else 0.0.

    Returns None when the optimizer clips by neither (``clipvalue`` is not a
    norm and is not reported).
    """
    optimizer = getattr(optimizer, "inner_optimizer", None) or optimizer
    clipnorm = getattr(optimizer, "clipnorm", None)
    global_clipnorm = getattr(optimizer, "global_clipnorm", None)
    if clipnorm and clipnorm > 0:
        norms = tf.sqrt(tf.cast(local.sum_squares, tf.float64))
        fired = tf.reduce_any(norms > float(clipnorm))
    elif global_clipnorm and global_clipnorm > 0:
        fired = tf.sqrt(tf.cast(local.total, tf.float64)) > float(global_clipnorm)
    else:
        return None
    return tf.cast(fired, tf.float64)


def clipping_configured(optimizer: Any) -> bool:
    """Whether the optimizer (or the one a LossScaleOptimizer wraps) clips by norm.

    False under gradient accumulation: Keras clips the averaged gradient of
    ``k`` micro-batches, which the instrumentation does not see.
    """
    inner = getattr(optimizer, "inner_optimizer", None) or optimizer
    if accumulation_steps(optimizer) > 1:
        return False
    return bool((getattr(inner, "clipnorm", None) or 0) > 0
                or (getattr(inner, "global_clipnorm", None) or 0) > 0)


def _inner(optimizer: Any) -> Any:
    return getattr(optimizer, "inner_optimizer", None) or optimizer


def accumulation_steps(optimizer: Any) -> int:
    """``gradient_accumulation_steps`` of the optimizer (or the one it wraps); 1 if unset."""
    try:
        return max(1, int(getattr(_inner(optimizer), "gradient_accumulation_steps", None) or 1))
    except (TypeError, ValueError):
        return 1


def micro_iterations(optimizer: Any) -> Any:
    """The optimizer's step counter in micro-steps (one per ``apply`` call).

    With ``gradient_accumulation_steps=k`` Keras' public ``iterations`` is the
    number of *updates* (``_iterations // k``); the instrumentation numbers
    every micro-batch, so it reads the raw counter.
    """
    inner = _inner(optimizer)
    if accumulation_steps(optimizer) > 1 and getattr(inner, "_iterations", None) is not None:
        return inner._iterations
    return optimizer.iterations


def unmeasured_notes(optimizer: Any) -> list[str]:
    """Plain-language notes on what cannot be measured with this optimizer setup."""
    inner = _inner(optimizer)
    notes = []
    clipvalue = getattr(inner, "clipvalue", None)
    if clipvalue:
        notes.append(
            f"tb-stability: clipvalue={clipvalue:g} clips element-wise; how often it fires is "
            "not reported (no `clipped` column) and grad_norm is the pre-clip norm"
        )
    k = accumulation_steps(optimizer)
    if k > 1:
        notes.append(
            f"tb-stability: gradient_accumulation_steps={k}: every micro-batch gets its own row "
            "(step = micro-step, its own gradient); weights move only when (step + 1) % "
            f"{k} == 0, so update_ratio is 0 on other steps (detectors ignore those zeros), "
            "and clipping frequency is not reported (Keras clips the averaged gradient)"
        )
    return notes


def warn_unmeasured(owner: Any, optimizer: Any) -> None:
    """Warns once per ``owner`` (a callback or monitor) for each `unmeasured_notes` entry."""
    import warnings

    seen = owner.__dict__.setdefault("_tb_unmeasured_warned", set())
    for note in unmeasured_notes(optimizer):
        if note not in seen:
            seen.add(note)
            warnings.warn(note, UserWarning, stacklevel=3)
