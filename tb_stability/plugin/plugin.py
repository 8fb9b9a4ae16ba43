"""HTTP routes of the ``stability`` TensorBoard plugin (documented in ``http_api.md``).

Routes are thin: they parse the request, take the logdir snapshot and call a
pure ``*_impl`` function returning ``(body, mime)``.
"""

from __future__ import annotations

import os

from tensorboard import errors, plugin_util
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from tb_stability import schema
from tb_stability.plugin import api
from tb_stability.plugin.data import LogdirCache, has_event_files

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_STATIC_MIME = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".map": "application/json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}


def static_impl(name: str) -> tuple[bytes, str]:
    """Body and MIME of a file of the built bundle.

    Only plain file names directly inside ``static/`` with a known extension
    are served; anything with a separator, a leading dot or ``..`` is
    refused with 400, anything else missing with 404.
    """
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise errors.InvalidArgumentError(f"invalid static file name {name!r}")
    mime = _STATIC_MIME.get(os.path.splitext(name)[1])
    allowed = set(os.listdir(STATIC_DIR)) if os.path.isdir(STATIC_DIR) else set()
    if mime is None or name not in allowed:
        raise errors.NotFoundError(f"no static file {name!r}")
    path = os.path.join(STATIC_DIR, name)
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(STATIC_DIR):
        raise errors.NotFoundError(f"no static file {name!r}")
    with open(path, "rb") as handle:
        return handle.read(), mime


class StabilityPlugin(base_plugin.TBPlugin):
    """Training-stability findings and charts for the logdir TensorBoard serves."""

    plugin_name = schema.PLUGIN_NAME

    def __init__(self, context):
        """Creates the plugin.

        Args:
          context: A `base_plugin.TBContext`; only ``context.logdir`` is used.
        """
        self._cache = LogdirCache(getattr(context, "logdir", "") or "")

    def get_plugin_apps(self):
        """Route table: data routes, the ES module and its static files."""
        return {
            "/runs": self._serve_runs,
            "/findings": self._serve_findings,
            "/series": self._serve_series,
            "/matrix": self._serve_matrix,
            "/info": self._serve_info,
            "/index.js": self._serve_index_js,
            "/style.css": self._serve_style_css,
            "/static/*": self._serve_static,
        }

    def is_active(self):
        """True when the logdir holds any event file (hence any run)."""
        return has_event_files(self._cache.logdir)

    def frontend_metadata(self):
        """The panel is an ES module rendered in an iframe."""
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Stability")

    # --- Pure implementations (ctx is TensorBoard's RequestContext, unused). ---

    def runs_impl(self, ctx):
        """See `api.runs_impl`."""
        del ctx
        return api.runs_impl(self._cache.snapshot())

    def findings_impl(self, ctx, run=None):
        """See `api.findings_impl`."""
        del ctx
        return api.findings_impl(self._cache.snapshot(), run)

    def series_impl(self, ctx, run, tag, source=None):
        """See `api.series_impl`."""
        del ctx
        return api.series_impl(self._cache.snapshot(), run, tag, source)

    def matrix_impl(self, ctx, run, quantity):
        """See `api.matrix_impl`."""
        del ctx
        return api.matrix_impl(self._cache.snapshot(), run, quantity)

    def info_impl(self, ctx, run):
        """See `api.info_impl`."""
        del ctx
        return api.info_impl(self._cache.snapshot(), run)

    # --- Routes. ---

    @staticmethod
    def _respond(request, result):
        body, mime = result
        return http_util.Respond(request, body, mime)

    @wrappers.Request.application
    def _serve_runs(self, request):
        return self._respond(request, self.runs_impl(plugin_util.context(request.environ)))

    @wrappers.Request.application
    def _serve_findings(self, request):
        run = request.args.get("run")
        if run is not None:
            run = api.require(run, "run")
        ctx = plugin_util.context(request.environ)
        return self._respond(request, self.findings_impl(ctx, run))

    @wrappers.Request.application
    def _serve_series(self, request):
        args = request.args
        ctx = plugin_util.context(request.environ)
        result = self.series_impl(ctx, args.get("run"), args.get("tag"), args.get("source"))
        return self._respond(request, result)

    @wrappers.Request.application
    def _serve_matrix(self, request):
        args = request.args
        ctx = plugin_util.context(request.environ)
        return self._respond(request, self.matrix_impl(ctx, args.get("run"), args.get("quantity")))

    @wrappers.Request.application
    def _serve_info(self, request):
        ctx = plugin_util.context(request.environ)
        return self._respond(request, self.info_impl(ctx, request.args.get("run")))

    @wrappers.Request.application
    def _serve_index_js(self, request):
        return self._respond(request, static_impl("index.js"))

    @wrappers.Request.application
    def _serve_style_css(self, request):
        return self._respond(request, static_impl("style.css"))

    @wrappers.Request.application
    def _serve_static(self, request):
        marker = f"/plugin/{schema.PLUGIN_NAME}/static/"
        path = request.path
        name = path[path.index(marker) + len(marker):] if marker in path else ""
        return self._respond(request, static_impl(name))
