"""Sealing what must be kept to retry a job but must not be readable at rest.

A job can carry secrets (a webhook ``secret`` in its sinks, a presigned image URL). A
retry or a dead-letter requeue needs them again; a person running ``worker dlq list`` or
reading Redis must not see them. With ``WORKER_SECRET_KEY`` set (a Fernet key: AES-128-CBC
+ HMAC-SHA256, from ``worker secrets keygen``), the worker keeps the full document
*sealed* beside a redacted copy. Without a key it keeps only the redacted copy, and an
entry that lost a secret cannot be retried: requeueing it is refused with a message that
names the setting.
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from worker.errors import ConfigurationError

PREFIX = "fernet:"


def generate_key() -> str:
    return Fernet.generate_key().decode()


class Sealer:
    """Seals and opens JSON documents with one Fernet key (``None``: sealing is off)."""

    def __init__(self, key: str | None) -> None:
        self._fernet: Fernet | None = None
        if key:
            try:
                self._fernet = Fernet(key.encode())
            except (ValueError, TypeError):
                raise ConfigurationError(
                    "WORKER_SECRET_KEY must be a Fernet key (32 url-safe base64 bytes); "
                    "make one with `worker secrets keygen`"
                ) from None

    @classmethod
    def from_settings(cls, settings: Any) -> Sealer:
        secret = getattr(settings, "secret_key", None)
        return cls(secret.get_secret_value() if secret is not None else None)

    @property
    def enabled(self) -> bool:
        return self._fernet is not None

    def seal(self, document: Any) -> str | None:
        """The sealed form of ``document``, or None when no key is configured."""
        if self._fernet is None:
            return None
        token = self._fernet.encrypt(json.dumps(document, sort_keys=True).encode())
        return PREFIX + token.decode()

    def open(self, sealed: str) -> Any:
        """The document inside ``sealed``; ConfigurationError if this key cannot open it."""
        if self._fernet is None:
            raise ConfigurationError(
                "this entry was sealed with WORKER_SECRET_KEY, which is not set here"
            )
        try:
            return json.loads(self._fernet.decrypt(sealed.removeprefix(PREFIX).encode()))
        except InvalidToken:
            raise ConfigurationError(
                "this entry was sealed with another WORKER_SECRET_KEY; set the key it was "
                "sealed with"
            ) from None
