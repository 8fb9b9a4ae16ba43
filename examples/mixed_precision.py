"""Mixed precision (LossScaleOptimizer) with StabilityCallback.

    python examples/mixed_precision.py --logdir runs/mixed_precision

Gradients are reported unscaled. A deliberately huge initial loss scale makes
the first steps overflow: the LossScaleOptimizer skips them and halves the
scale, and the steps block shows ``skipped`` = 1 and ``loss_scale`` for them.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def main(logdir: str, steps: int = 12, every: int = 4, initial_scale: float = 2.0 ** 18) -> None:
    """Trains a tiny float16 MLP under a LossScaleOptimizer."""
    import keras

    from instrumentation import StabilityCallback

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        rng = np.random.RandomState(0)
        x = rng.randn(steps * 8, 4).astype("float32")
        y = (x @ rng.randn(4, 1)).astype("float32")
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                                  keras.layers.Dense(1, dtype="float32")])
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.05), initial_scale=initial_scale)
        model.compile(optimizer, "mse")
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                  callbacks=[StabilityCallback(logdir, every=every)])
    finally:
        keras.mixed_precision.set_global_policy("float32")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--logdir", default="runs/mixed_precision")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    main(args.logdir, args.steps)
