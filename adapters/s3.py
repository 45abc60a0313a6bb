"""S3 (and S3-compatible stores): a source for ``s3://bucket/key`` and a result sink.

Credentials come from the standard AWS chain (environment, shared config, instance or
pod role); ``WORKER_S3__ENDPOINT_URL`` points at MinIO, Ceph, R2 and the like.

The sink writes ``{prefix}{job_id}.json``, a deterministic key, so a redelivered job
overwrites its object. Optionally it writes the labels and flags back onto the source
object as object tags (``tag_source=true``, merged with the object's own tags within
S3's limits: 10 tags, keys ≤ 128 and values ≤ 256 characters) and/or a sidecar object
``{source key}{sidecar_suffix}`` beside the source.
"""

from __future__ import annotations

import re
import threading
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.documents import Result
from worker.errors import PermanentSinkError, RetryableSinkError, SourceError
from worker.log import get_logger
from worker.plugins import PluginContext, Sink, Source

log = get_logger(__name__)
MAX_TAGS = 10
MAX_TAG_KEY = 128
MAX_TAG_VALUE = 256
_TAG_CHARS = re.compile(r"[^\w\s+\-=.:/@]")  # characters S3 allows in tags
_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_DENIED = {
    "AccessDenied",
    "403",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
}
_RETRYABLE = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
    "RequestTimeTooSkewed",
}
ACTION_RANK = {"flag": 1, "review": 2, "block": 3}

_clients: dict[tuple[Any, ...], Any] = {}  # botocore clients are built dynamically
_clients_lock = threading.Lock()


def s3_client(settings: Any) -> Any:
    """One boto3 client per process and configuration (clients are thread-safe)."""
    s3 = settings.s3
    key = (s3.endpoint_url, s3.region, s3.addressing_style, s3.connect_timeout_s, s3.read_timeout_s)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            config = Config(
                connect_timeout=s3.connect_timeout_s,
                read_timeout=s3.read_timeout_s,
                retries={"max_attempts": 3, "mode": "standard"},
                s3={"addressing_style": s3.addressing_style},
            )
            client = boto3.session.Session().client(
                "s3", endpoint_url=s3.endpoint_url, region_name=s3.region, config=config
            )
            _clients[key] = client
        return client


def split_s3_uri(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3://bucket/key URI: {uri}")
    return parts.netloc, parts.path.lstrip("/")


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Source(Source):
    schemes = ("s3",)

    def __init__(self, context: PluginContext) -> None:
        super().__init__(context)
        self.max_bytes: int = context.settings.image.max_bytes

    def fetch(self, uri: str) -> bytes:
        try:
            bucket, key = split_s3_uri(uri)
        except ValueError as exc:
            raise SourceError(str(exc), code="source_invalid") from None
        try:
            obj = s3_client(self.context.settings).get_object(Bucket=bucket, Key=key)
            size = int(obj.get("ContentLength") or 0)
            if size > self.max_bytes:
                obj["Body"].close()
                raise SourceError(
                    f"{uri} is {size} bytes, over the cap of {self.max_bytes} "
                    "(WORKER_IMAGE__MAX_BYTES)",
                    code="image_too_large",
                )
            data: bytes = obj["Body"].read(self.max_bytes + 1)
        except ClientError as exc:
            code = _error_code(exc)
            if code in _NOT_FOUND:
                raise SourceError(f"{uri} does not exist", code="source_not_found") from None
            if code in _DENIED:
                raise SourceError(f"{uri}: access denied ({code})", code="source_denied") from None
            raise SourceError(f"{uri}: {code or exc}", code="source_unavailable") from None
        except (ConnectTimeoutError, ReadTimeoutError) as exc:
            raise SourceError(f"{uri}: {exc}", code="source_timeout") from None
        except BotoCoreError as exc:
            raise SourceError(f"{uri}: {exc}", code="source_unavailable") from None
        if len(data) > self.max_bytes:
            raise SourceError(f"{uri} is over the byte cap", code="image_too_large")
        return data


class S3Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prefix: str = Field(description="s3://bucket/prefix/ where {job_id}.json is written.")
    tag_source: bool = Field(False, description="Write labels/flags as tags on an s3:// source.")
    sidecar: bool = Field(False, description="Write the result beside an s3:// source object.")
    sidecar_suffix: str = Field(".moderation.json", description="Sidecar key suffix.")
    tag_prefix: str = Field("moderation-", description="Prefix of the tag keys written.")

    @field_validator("prefix")
    @classmethod
    def _s3_prefix(cls, value: str) -> str:
        split_s3_uri(value if value.count("/") >= 3 else value.rstrip("/") + "/")
        return value


def result_tags(result: Result, prefix: str) -> list[tuple[str, str]]:
    """Our tags for ``result``, most important first, within S3's length limits."""
    strongest = max((ACTION_RANK[f.action] for f in result.flags), default=0)
    action = {v: k for k, v in ACTION_RANK.items()}.get(strongest, "none")
    pairs = [
        (
            "status",
            result.status
            if result.status == "ok"
            else f"error:{result.error.code if result.error else ''}",
        ),
        ("action", action),
        ("flags", " ".join(dict.fromkeys(f.category for f in result.flags)) or "none"),
        ("labels", " ".join(result.labels) or "none"),
    ]
    tags = []
    for key, value in pairs:
        clean_key = _TAG_CHARS.sub("_", prefix + key)[:MAX_TAG_KEY]
        clean_value = _TAG_CHARS.sub("_", value)[:MAX_TAG_VALUE]
        tags.append((clean_key, clean_value))
    return tags


def merge_tags(
    existing: list[dict[str, str]], ours: list[tuple[str, str]], prefix: str
) -> tuple[list[dict[str, str]], int]:
    """Keep the object's own tags, replace ours, and fit within 10 by dropping our least
    important; returns the tag set and how many of ours did not fit."""
    kept = [t for t in existing if not t["Key"].startswith(prefix)]
    room = max(MAX_TAGS - len(kept), 0)
    fitted = [{"Key": k, "Value": v} for k, v in ours[:room]]
    return kept + fitted, len(ours) - len(fitted)


class S3Sink(Sink):
    name = "s3"
    Options = S3Options
    target_option = "prefix"

    def __init__(self, options: S3Options, context: PluginContext) -> None:
        super().__init__(options, context)
        self.bucket, self.key_prefix = split_s3_uri(options.prefix)

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except ClientError as exc:
            code = _error_code(exc)
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            message = f"{what}: {code or status} {exc}"
            if code in _RETRYABLE or status >= 500 or status == 429:
                raise RetryableSinkError(message) from None
            raise PermanentSinkError(message) from None
        except BotoCoreError as exc:  # connection errors, timeouts
            raise RetryableSinkError(f"{what}: {exc}") from None

    def deliver(self, result: Result) -> None:
        client = s3_client(self.context.settings)
        body = result.to_json().encode()
        source = result.image.uri or ""
        if source.startswith("s3://"):
            self._mark_source(client, result, source, body)
        # The result object goes last: once it exists, the tags and sidecar are there too.
        key = f"{self.key_prefix}{result.job_id}.json"
        self._call(
            f"put s3://{self.bucket}/{key}",
            client.put_object,
            Bucket=self.bucket,
            Key=key,
            Body=body,
            ContentType="application/json",
        )

    def _mark_source(self, client: Any, result: Result, source: str, body: bytes) -> None:
        """The sidecar beside the source object and the result tags on it, as asked."""
        bucket, source_key = split_s3_uri(source)
        if self.options.sidecar:
            self._call(
                f"put sidecar of {source}",
                client.put_object,
                Bucket=bucket,
                Key=source_key + self.options.sidecar_suffix,
                Body=body,
                ContentType="application/json",
            )
        if self.options.tag_source:
            existing = self._call(
                f"get tags of {source}", client.get_object_tagging, Bucket=bucket, Key=source_key
            )
            ours = result_tags(result, self.options.tag_prefix)
            tags, dropped = merge_tags(existing.get("TagSet", []), ours, self.options.tag_prefix)
            if dropped:
                log.warning(
                    "sink.tags_truncated", job_id=result.job_id, source=source, dropped=dropped
                )
            self._call(
                f"tag {source}",
                client.put_object_tagging,
                Bucket=bucket,
                Key=source_key,
                Tagging={"TagSet": tags},
            )
