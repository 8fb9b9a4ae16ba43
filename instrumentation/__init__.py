"""Training-side instrumentation of tb-stability (imports TensorFlow).

Public API:
  StabilityCallback: a Keras callback for ``model.fit``.
  StabilityMonitor: the same measurements for custom training loops.
"""

from instrumentation.callback import StabilityCallback
from instrumentation.monitor import StabilityMonitor

__all__ = ["StabilityCallback", "StabilityMonitor"]
