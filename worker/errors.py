"""Exceptions raised by moderation-worker.

Every error the project raises on purpose derives from :class:`WorkerError`::

    WorkerError
    ├── ConfigurationError        bad settings; the message names the setting to change
    │   └── PluginError           unknown plugin name or bad plugin options (start-up)
    ├── ModelLoadError            the model cannot be loaded (never replaced by random weights)
    ├── PolicyError               one or more ``file:line: message`` problems in policy YAML
    ├── DataError                 labelled data for eval/finetune has problems (all listed)
    ├── MessageRefusedError       a queue message that is not a job (dead-lettered)
    ├── RequeueRefusedError       a dead letter that cannot be retried as it is (kept)
    ├── JobTimeoutError           no result within the time given to ``wait``
    ├── JobError                  a per-job failure with a stable ``code``
    │   ├── SourceError           fetching the image failed (``source_*`` codes)
    │   └── ImageError            decoding the image failed (``image_*``, ``format_*`` codes)
    └── SinkError                 delivering a result failed
        ├── RetryableSinkError    try again later (timeouts, 5xx, throttling)
        └── PermanentSinkError    do not retry (4xx, endpoint gone, bad credentials)

Per-job errors never escape the pipeline: they become result documents with
``status: "error"`` and ``error.code`` (see :data:`ERROR_CODES`). Only programmer
errors raise through.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Every stable ``error.code`` a result document can carry, with its meaning.
#: docs/errors.md is generated from (and tested against) this table.
ERROR_CODES: dict[str, str] = {
    "source_not_found": "The image does not exist at the given path, key or URL (404).",
    "source_blocked": "The address is not allowed (private, loopback, link-local, metadata, "
    "or outside the configured roots) and no request was made.",
    "source_denied": "The source refused access (401/403, AccessDenied): check credentials.",
    "source_timeout": "Fetching the image took longer than the configured time cap.",
    "source_unavailable": "The image source failed in a way that may pass (connection error, "
    "5xx, throttling).",
    "source_invalid": "The image reference is malformed (unknown scheme, bad base64, ...).",
    "image_too_large": "The image exceeds the byte cap or the pixel cap "
    "(decompression-bomb guard).",
    "image_unreadable": "The bytes are not a decodable image (corrupt, truncated, not an image).",
    "format_not_allowed": "The image decodes but its format is not in the allowlist.",
    "policy_not_found": "The job names a policy that is not loaded.",
    "sink_not_allowed": "The job names a sink that settings do not allow jobs to use (a sink "
    "type outside WORKER_JOB_SINK_TYPES, bad sink options, or a local path outside "
    "WORKER_SINK_ROOTS); nothing was scored or delivered.",
    "internal_error": "An unexpected failure while scoring this job; the message has details.",
}


#: Codes of failures that may pass: the job is submitted again after a backoff.
RETRYABLE_CODES = frozenset({"source_unavailable", "source_timeout"})


class WorkerError(Exception):
    """Base class of every error raised on purpose by moderation-worker."""


class ConfigurationError(WorkerError):
    """A setting is missing or invalid. The message names the setting to change."""


class PluginError(ConfigurationError):
    """An unknown plugin name or invalid plugin options, found at start-up."""


class ModelLoadError(WorkerError):
    """The configured model cannot be loaded. Never silently replaced by random weights."""


@dataclass(frozen=True)
class PolicyProblem:
    """One problem in a policy file, pointing at the line to fix."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class PolicyError(WorkerError):
    """One or more problems in policy files, each rendered as ``file:line: message``."""

    def __init__(self, problems: list[PolicyProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class JobError(WorkerError):
    """A failure that belongs to one job. ``code`` is one of :data:`ERROR_CODES`."""

    code = "internal_error"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if self.code not in ERROR_CODES:  # a programmer error: every code is documented
            raise ValueError(f"undocumented error code {self.code!r}")

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class SourceError(JobError):
    """Fetching an image failed. ``retryable`` is true for :data:`RETRYABLE_CODES`."""

    code = "source_unavailable"

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        return self.code in RETRYABLE_CODES


class DataError(WorkerError):
    """The labelled data has problems; ``problems`` lists every one, naming file or label."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in the data:\n  " + "\n  ".join(problems))


class MessageRefusedError(WorkerError):
    """A queue message that is not a job this worker can take; the text says why."""


class RequeueRefusedError(WorkerError):
    """A dead-letter entry that cannot be retried as it is; the entry is kept."""


class JobTimeoutError(WorkerError, TimeoutError):
    """No result arrived within the time given to ``wait``."""


class ImageError(JobError):
    """Decoding an image failed."""

    code = "image_unreadable"


class SinkError(WorkerError):
    """Delivering a result failed."""

    retryable = False

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RetryableSinkError(SinkError):
    """A delivery failure that may pass: retry later (``retry_after`` seconds if known)."""

    retryable = True


class PermanentSinkError(SinkError):
    """A delivery failure that retrying will not fix."""

    retryable = False
