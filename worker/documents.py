"""The job and result documents (pydantic). Their JSON Schemas live in docs/schemas/."""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,199}$")
JobId = Annotated[str, StringConstraints(pattern=JOB_ID.pattern)]
SCHEMA_FILES = {"job": "job.schema.json", "result": "result.schema.json"}
#: Limits on a job's pass-through ``metadata`` (it is copied into every result).
METADATA_MAX_DEPTH = 16
METADATA_MAX_BYTES = 64 * 1024


def json_depth(value: Any) -> int:
    """Nesting depth of decoded JSON, without recursion (0 for a scalar)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list | tuple):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in node)
    return deepest


def new_job_id() -> str:
    return uuid.uuid4().hex


class ImageRef(BaseModel):
    """Where the image is: a ``uri`` (path, file://, s3://, http(s)://) or inline ``data``."""

    model_config = ConfigDict(extra="forbid")

    uri: str | None = Field(None, description="Path, file://, s3://bucket/key or http(s):// URL.")
    data: str | None = Field(None, description="The image bytes, base64-encoded.")
    filename: str | None = Field(None, description="Original file name (informational).")

    @model_validator(mode="after")
    def _one_source(self) -> ImageRef:
        if (self.uri is None) == (self.data is None):
            raise ValueError("give exactly one of image.uri and image.data")
        return self

    def decoded_data(self) -> bytes:
        """The inline bytes; raises ValueError on bad base64."""
        try:
            return base64.b64decode(self.data or "", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"image.data is not valid base64: {exc}") from None


class SinkConfig(BaseModel):
    """A sink by plugin name plus that plugin's own options."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(max_length=64, description="Sink plugin name (`worker plugins` lists them).")

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Job(BaseModel):
    """What an upload service enqueues."""

    model_config = ConfigDict(extra="forbid")

    job_id: JobId = Field(
        default_factory=new_job_id,
        description="Client-chosen or generated; the idempotency key.",
    )
    image: ImageRef
    policies: list[str] | None = Field(
        None, description="Policy names to score; default = every loaded policy."
    )
    sinks: list[SinkConfig] = Field(
        default_factory=list,
        max_length=8,
        description="Where to deliver the result (at most 8); default = settings.",
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description=f"Passed through as is (at most {METADATA_MAX_DEPTH} levels deep and "
        f"{METADATA_MAX_BYTES // 1024} KiB as JSON).",
    )

    @field_validator("metadata", mode="before")
    @classmethod
    def _bounded_metadata(cls, value: Any) -> Any:
        if json_depth(value) > METADATA_MAX_DEPTH:
            raise ValueError(f"metadata is nested deeper than {METADATA_MAX_DEPTH} levels")
        try:
            size = len(json.dumps(value))
        except (TypeError, ValueError, RecursionError):
            raise ValueError("metadata is not JSON") from None
        if size > METADATA_MAX_BYTES:
            raise ValueError(f"metadata is {size} bytes as JSON, over {METADATA_MAX_BYTES}")
        return value


class ImageInfo(BaseModel):
    uri: str | None = None
    filename: str | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    frames_scored: int | None = Field(
        None,
        description="Animated GIF/WebP/APNG only: how many frames were scored "
        "(WORKER_IMAGE__MAX_FRAMES, fewer if the pixel budget runs out).",
    )
    frames_total: int | None = Field(
        None,
        description="Animated images only: the frames in the animation, when known "
        "(a GIF's frames are counted up to 1000).",
    )
    frame_indices: list[int] | None = Field(
        None, description="Animated images only: the 0-based indices of the frames scored."
    )
    pdq: str | None = Field(
        None,
        description="When a PDQ hash list is loaded: the image's PDQ hash, 64 hex digits as "
        "ThreatExchange writes them, of the full-resolution EXIF-rotated decode.",
    )
    pdq_quality: int | None = Field(
        None, description="When `pdq` is given: PDQ's quality (0-100; under 50 matches poorly)."
    )


class ModelInfo(BaseModel):
    name: str
    pretrained: str
    fingerprint: str


class Evidence(BaseModel):
    """Why a category scored high: the closest of its prompts (or exemplars) and the
    closest background, each by cosine to the image."""

    prompt: str | None = Field(
        None,
        description="The category prompt as the YAML writes it (not templated) whose "
        "template-ensembled head is closest to the image; null for an exemplar category, "
        "whose flag names its closest exemplar in `item`.",
    )
    similarity: float = Field(
        description="Cosine between the image and that head (or closest exemplar)."
    )
    background: str | None = Field(
        None,
        description="The closest background prompt (or background exemplar id).",
    )
    background_similarity: float | None = Field(
        None, description="Cosine between the image and that background's head."
    )
    margin: float | None = Field(
        None,
        description="logit_scale x (similarity - background_similarity): how far the "
        "category's closest prompt is ahead of the closest background, in logits.",
    )


class Flag(BaseModel):
    policy: str
    category: str
    score: float
    threshold: float
    action: Literal["flag", "review", "block"]
    severity: Literal["low", "medium", "high", "critical"]
    frame: int | None = Field(
        None,
        description="Animated images only: the 0-based index of the frame whose score "
        "raised the flag.",
    )
    item: str | None = Field(
        None,
        description="Exemplar categories and blocklists: the id (file stem, or a hash "
        "list's id) of the listed image that matched, or of the closest exemplar.",
    )
    distance: int | None = Field(
        None, description="PDQ matches: the Hamming distance to the listed hash (0-256)."
    )
    similarity: float | None = Field(
        None,
        description="Exemplar and embedding matches: the cosine between the image and the "
        "listed image (or closest exemplar).",
    )
    evidence: Evidence | None = Field(
        None,
        description="Category flags: the closest prompt and background and the margin "
        "between them (blocklist matches name their item instead).",
    )


#: A result's decision, mildest first.
DecisionAction = Literal["allow", "flag", "review", "block"]
DECISION_ACTIONS: tuple[str, ...] = ("allow", "flag", "review", "block")


class Decision(BaseModel):
    """What the upload service should do: the strongest action among the live flags."""

    action: DecisionAction
    categories: list[str] = Field(
        default_factory=list,
        description="`policy/category` of every flag carrying that action (empty for allow).",
    )

    @classmethod
    def of(cls, flags: list[Flag]) -> Decision:
        """``allow`` without flags; else the strongest flag action and who carries it."""
        if not flags:
            return cls(action="allow")
        strongest = max((f.action for f in flags), key=DECISION_ACTIONS.index)
        carriers = [f"{f.policy}/{f.category}" for f in flags if f.action == strongest]
        return cls(action=strongest, categories=list(dict.fromkeys(carriers)))


#: A policy section's mode: a shadow policy is scored and reported, never acted on.
PolicyMode = Literal["live", "shadow"]
MODE_DESCRIPTION = (
    "`shadow`: scored and reported here only; its flags never reach the top-level "
    "`flags`, `labels` or `decision`."
)


class ModerationResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str
    mode: PolicyMode = Field("live", description=MODE_DESCRIPTION)
    scores: dict[str, float]
    flags: list[Flag]


class BlocklistResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str
    mode: PolicyMode = Field("live", description=MODE_DESCRIPTION)
    matches: list[Flag] = Field(description="The listed images this image matched, if any.")


class TagScore(BaseModel):
    tag: str
    score: float


class TagsResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str
    mode: PolicyMode = Field("live", description=MODE_DESCRIPTION)
    tags: list[TagScore]


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable snake_case code, listed in docs/errors.md.")
    message: str


class Result(BaseModel):
    """What sinks receive: scores, flags and labels of one job, or its error."""

    job_id: JobId
    status: Literal["ok", "error"]
    error: ErrorInfo | None = None
    image: ImageInfo
    model: ModelInfo
    policies: dict[str, ModerationResult | TagsResult | BlocklistResult] = Field(
        default_factory=dict
    )
    flags: list[Flag] = Field(
        default_factory=list, description="Every live policy's flags (shadow ones excluded)."
    )
    labels: list[str] = Field(
        default_factory=list, description="Every tag kept by a live policy, best first."
    )
    decision: Decision | None = Field(
        None,
        description="The strongest action among the live flags, and the categories behind it "
        "(`allow` when nothing is flagged); null for an error result.",
    )
    metadata: dict[str, Any] = Field(default_factory=dict)
    timings_ms: dict[str, float] = Field(default_factory=dict)
    worker: str = ""
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def to_json(self) -> str:
        return self.model_dump_json()

    def summary(self) -> dict[str, Any]:
        """Status, error and the flags' names: the part of the document a task event or
        a log line shows, without dumping the whole document."""
        error = {"code": self.error.code, "message": self.error.message} if self.error else None
        flags = [{"policy": f.policy, "category": f.category} for f in self.flags]
        decision = self.decision.model_dump() if self.decision else None
        return {"status": self.status, "error": error, "decision": decision, "flags": flags}


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schemas of the job and result documents, by file name."""
    return {
        SCHEMA_FILES["job"]: Job.model_json_schema(),
        SCHEMA_FILES["result"]: Result.model_json_schema(mode="serialization"),
    }


def write_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        path = directory / name
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(path)
    return written
