"""Keeping secrets out of what the worker writes down: results, logs, dead letters, errors.

Three kinds of secret reach the worker from senders it does not control:

- sink options that are secrets (``secret``, ``token``, ``password``… in a job's ``sinks``
  or a ``--sink`` spec);
- signatures and credentials inside URLs: presigned S3/GCS/Azure query values
  (``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``, ``sig``…) and
  ``user:password@`` userinfo;
- ``whsec_…`` webhook secrets wherever they appear in free text.

:func:`redact_uri`, :func:`redact_config` and :func:`redact_text` replace them with
:data:`REDACTED`. They are pure and cheap; :func:`redact_job` applies them to a job
document. Whether a document lost anything is what :func:`redact_job` reports, so callers
can tell a retryable entry from one that needs the sealed copy (``worker.sealing``).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "REDACTED"
#: Option names whose values are secrets, in any sink's options.
SECRET_OPTIONS = frozenset(
    {"secret", "token", "password", "api_key", "apikey", "key", "authorization", "credentials"}
)
#: Query parameters that carry signatures or credentials (lower case).
_SECRET_QUERY = re.compile(
    r"^(x-amz-(signature|credential|security-token)|x-goog-(signature|credential)|"
    r"signature|sig|se|sv|token|access_token|auth|authorization|api_key|apikey|key|"
    r"password|secret|awsaccesskeyid|x-ms-signature)$",
    re.IGNORECASE,
)
_WHSEC = re.compile(r"whsec_(?!REDACTED)[A-Za-z0-9+/=_\-]{4,}")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
_SECRET_PAIR = re.compile(
    # key=value / "key": "value" pairs whose key names a secret (client_secret, api-key…);
    # placeholders in examples ("key=value", "whsec_...") stay readable.
    r"(?i)(?P<key>(?<![\w-])[\w-]*(?:secret|token|password|passwd|key|credentials|authorization))"
    r"(?P<sep>['\"]?\s*[=:]\s*['\"]?)"
    r"(?!value\b)(?![^,;&\s'\"]*(?:\.\.\.|…))(?P<value>[^,;&\s'\"}]+)"
)


def redact_uri(uri: str) -> str:
    """``uri`` with userinfo and signature/credential query values replaced."""
    if "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return _WHSEC.sub("whsec_" + REDACTED, uri)
    netloc = parts.netloc
    if "@" in netloc:  # user:password@ keeps the user; a lone token@ goes entirely
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{REDACTED}@{host}" if colon else f"{REDACTED}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_QUERY.match(k) for k, _ in pairs):
            query = urlencode(
                [(k, REDACTED if _SECRET_QUERY.match(k) else v) for k, v in pairs], safe="/:"
            )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Free text (an error message, a raw message body) with every secret we can spot
    replaced: URLs, ``whsec_`` secrets, ``secret=…`` / ``"token": "…"`` pairs."""
    text = _URL_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)
    text = _WHSEC.sub("whsec_" + REDACTED, text)
    return _SECRET_PAIR.sub(lambda m: f"{m.group('key')}{m.group('sep')}{REDACTED}", text)


def secret_values(text: str) -> list[str]:
    """The secret values :func:`redact_text` would take out of ``text`` (to scrub them from
    messages that quote ``text`` in other forms)."""
    values = [m.group("value") for m in _SECRET_PAIR.finditer(text)]
    values += [m.group(0) for m in _WHSEC.finditer(text)]
    for url in _URL_IN_TEXT.findall(text):
        userinfo = urlsplit(url).netloc.rpartition("@")[0] if "@" in url else ""
        values += [v for v in userinfo.split(":") if v]
    return [v for v in values if len(v) >= 4 and v != REDACTED]


def redact_config(config: dict[str, Any]) -> dict[str, Any]:
    """A sink config with secret options replaced and URLs redacted."""
    clean: dict[str, Any] = {}
    for key, value in config.items():
        if key.lower() in SECRET_OPTIONS and value is not None:
            clean[key] = REDACTED
        elif isinstance(value, str):
            clean[key] = redact_uri(value)
        else:
            clean[key] = value
    return clean


def redact_job(job: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A job document safe to write down, and whether anything was taken out of it."""
    clean = dict(job)
    image = clean.get("image")
    if isinstance(image, dict) and isinstance(image.get("uri"), str):
        clean["image"] = {**image, "uri": redact_uri(image["uri"])}
    sinks = clean.get("sinks")
    if isinstance(sinks, list):
        clean["sinks"] = [redact_config(s) if isinstance(s, dict) else s for s in sinks]
    return clean, clean != job
