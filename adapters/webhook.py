"""Webhooks per Standard Webhooks (https://www.standardwebhooks.com).

Each delivery POSTs the result document with:

- ``webhook-id``: the job id, the same on every retry, so receivers can deduplicate;
- ``webhook-timestamp``: seconds since the epoch at sending time;
- ``webhook-signature``: ``v1,`` + base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}`` under
  the ``whsec_…`` secret (base64 after the prefix).

Only 2xx is success. 410 Gone disables the endpoint (kept in Redis, logged as
``sink.endpoint_disabled``; `worker webhooks enable URL` turns it back on). Any other
answer, a timeout or a refused connection is retried by the queue with backoff, at least
``Retry-After`` when the receiver sends one. Redirects are not followed. The URL goes
through the same SSRF guard as image fetching.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from email.utils import parsedate_to_datetime

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from adapters.safehttp import limits_from, request
from worker.documents import Result
from worker.errors import PermanentSinkError, PluginError, RetryableSinkError, SourceError
from worker.log import get_logger
from worker.plugins import PluginContext, PluginState, Sink
from worker.redact import redact_uri

log = get_logger(__name__)
SECRET_PREFIX = "whsec_"
RESPONSE_CAP = 64 * 1024


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a ``whsec_…`` secret; PluginError if it is not one."""
    if not secret.startswith(SECRET_PREFIX):
        raise PluginError("webhook secret must start with 'whsec_' (Standard Webhooks)")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :] + "==", validate=False)
    except (binascii.Error, ValueError):
        raise PluginError("webhook secret is not base64 after 'whsec_'") from None
    if len(key) < 16:
        raise PluginError("webhook secret is too short (want at least 16 bytes)")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: str) -> str:
    digest = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


def _disabled_key(url: str) -> str:
    return "disabled:webhook:" + hashlib.sha256(url.encode()).hexdigest()[:24]


class WebhookOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="Receiver URL (http or https).")
    secret: SecretStr | None = Field(None, description="whsec_... secret; default settings.")
    timeout_s: float | None = Field(None, gt=0, description="Per-request timeout.")


class WebhookSink(Sink):
    name = "webhook"
    Options = WebhookOptions
    target_option = "url"

    def __init__(self, options: WebhookOptions, context: PluginContext) -> None:
        super().__init__(options, context)
        settings = context.settings
        secret = options.secret or settings.webhook.secret
        if secret is None:
            raise PluginError(
                "webhook sink needs a signing secret: set WORKER_WEBHOOK__SECRET=whsec_... "
                "or give the sink secret=whsec_..."
            )
        self.key = decode_secret(secret.get_secret_value())
        timeout = options.timeout_s or settings.webhook.timeout_s
        self.limits = limits_from(settings, RESPONSE_CAP, total_timeout_s=timeout)
        self.state = context.state
        self._disabled_here: set[str] = set()  # without shared state (worker classify)

    @classmethod
    def reenable(cls, state: PluginState, url: str) -> bool:
        """Turn an endpoint disabled by 410 Gone back on; False if it was not disabled."""
        key = _disabled_key(url)
        if state.get(key) is None:
            return False
        state.delete(key)
        return True

    def _disabled(self, key: str) -> str | None:
        if self.state is not None:
            return self.state.get(key)
        return "410 Gone earlier in this run" if key in self._disabled_here else None

    def _disable(self, key: str, reason: str) -> None:
        if self.state is not None:
            self.state.set(key, reason)
        self._disabled_here.add(key)

    def deliver(self, result: Result) -> None:
        url = self.options.url
        key = _disabled_key(url)
        why = self._disabled(key)
        if why:
            raise PermanentSinkError(
                f"webhook {url} is disabled ({why}); re-enable with `worker webhooks enable {url}`"
            )
        body = result.to_json()
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": result.job_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.key, result.job_id, timestamp, body),
        }
        try:
            response = request(
                "POST",
                url,
                self.limits,
                body=body.encode(),
                headers=headers,
                follow_redirects=False,
            )
        except SourceError as exc:
            if exc.code in {"source_blocked", "source_invalid"}:
                raise PermanentSinkError(f"webhook {url}: {exc}") from None
            raise RetryableSinkError(f"webhook {url}: {exc}") from None
        if 200 <= response.status < 300:
            return
        if response.status == 410:
            reason = f"410 Gone at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
            self._disable(key, reason)
            log.error(
                "sink.endpoint_disabled", url=redact_uri(url), job_id=result.job_id, reason=reason
            )
            raise PermanentSinkError(f"webhook {url} answered 410 Gone: endpoint disabled")
        raise RetryableSinkError(
            f"webhook {url} answered HTTP {response.status}",
            retry_after=retry_after_seconds(response.headers.get("Retry-After")),
        )
