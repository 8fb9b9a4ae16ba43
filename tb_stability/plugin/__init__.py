"""The TensorBoard plugin of tb-stability (plugin name ``"stability"``).

`loader.StabilityPluginLoader` is the ``tensorboard_plugins`` entry point;
`plugin.StabilityPlugin` holds the thin HTTP routes; `api` the pure route
implementations; `static/` the built frontend bundle (see ``http_api.md``).
"""
