"""tb-stability: a training-stability doctor for TensorFlow/Keras in TensorBoard.

The reader side: event-file reader, detectors, CLI and TensorBoard plugin.
Never imports TensorFlow.
"""

__version__ = "0.1.0"
