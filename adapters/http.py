"""``http://`` and ``https://`` images, fetched through the SSRF guard in ``safehttp``."""

from __future__ import annotations

from adapters.safehttp import HttpLimits, limits_from, request
from worker.errors import SourceError
from worker.plugins import PluginContext, Source

_STATUS_CODES = {404: "source_not_found", 410: "source_not_found", 401: "source_denied"}
_STATUS_CODES[403] = "source_denied"


class HttpSource(Source):
    schemes = ("http", "https")

    def __init__(self, context: PluginContext) -> None:
        super().__init__(context)
        self.limits: HttpLimits = limits_from(context.settings, context.settings.image.max_bytes)

    def fetch(self, uri: str) -> bytes:
        response = request("GET", uri, self.limits, headers={"Accept": "image/*"})
        if 200 <= response.status < 300:
            return response.body
        code = _STATUS_CODES.get(response.status)
        if code is None:
            retryable = response.status == 429 or response.status >= 500
            code = "source_unavailable" if retryable else "source_invalid"
        raise SourceError(f"{uri}: HTTP {response.status}", code=code)
