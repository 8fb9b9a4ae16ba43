"""Entry point of the plugin: ``stability = tb_stability.plugin.loader:StabilityPluginLoader``.

Kept free of heavy imports so TensorBoard can always import it; the plugin
module itself is imported in `StabilityPluginLoader.load`.
"""

from __future__ import annotations

from tensorboard.plugins import base_plugin


class StabilityPluginLoader(base_plugin.TBLoader):
    """Loads the `StabilityPlugin` (no flags of its own)."""

    def load(self, context):
        """Creates the plugin for this TensorBoard instance.

        Args:
          context: The `base_plugin.TBContext`; its ``logdir`` is read.

        Returns:
          A `tb_stability.plugin.plugin.StabilityPlugin`.
        """
        from tb_stability.plugin.plugin import StabilityPlugin  # pylint: disable=import-outside-toplevel

        return StabilityPlugin(context)
