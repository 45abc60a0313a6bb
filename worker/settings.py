"""Settings: environment variables (``WORKER_`` prefix, ``__`` nesting) and an optional TOML file.

Read once at the entry points (CLI, Celery app) and passed down as values; library code
never reads the environment. Precedence: explicit overrides > environment > config file >
defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from worker.errors import ConfigurationError

ENV_PREFIX = "WORKER_"
CONFIG_FILE_ENV = "WORKER_CONFIG_FILE"
#: Images per encoder batch unless settings say otherwise (or a GPU was measured).
DEFAULT_BATCH_SIZE = 32
#: The policies shipped inside the package (in the wheel too): used when no directory is set.
SHIPPED_POLICY_DIR = Path(__file__).resolve().parent / "shipped_policies"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moderation-worker"


class Section(BaseModel):
    """A group of settings (``WORKER_<GROUP>__*``); unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")


class ModelSettings(Section):
    """Which OpenCLIP model to load (``WORKER_MODEL__*``)."""

    name: str = Field(
        "ViT-B-32",
        description="open_clip model name, 'hf-hub:org/repo' or 'local-dir:/path'.",
    )
    pretrained: str = Field(
        "laion2b_s34b_b79k",
        description="Pretrained tag for a built-in name, or a path to a weights file. "
        "Ignored for hf-hub: and local-dir: names.",
    )
    download_dir: Path | None = Field(
        None, description="Where open_clip caches downloaded weights (default: the HF cache)."
    )
    hub_probe_timeout_s: float = Field(
        5.0,
        gt=0,
        description="How long to wait when checking that the model hub is reachable before "
        "downloading; an unreachable hub with no cached weights fails at once.",
    )


class BatchSettings(Section):
    """Micro-batching (``WORKER_BATCH__*``)."""

    max_size: int = Field(
        DEFAULT_BATCH_SIZE,
        ge=0,
        le=4096,
        description="Most images encoded together; 0 = choose from free GPU memory "
        f"({DEFAULT_BATCH_SIZE} on CPU).",
    )
    max_wait_ms: int = Field(
        50, ge=0, le=60_000, description="Longest wait for a batch to fill (queue only)."
    )

    @property
    def batch_size(self) -> int:
        """The size to batch with before a GPU is measured (``max_size`` 0 = measure)."""
        return self.max_size or DEFAULT_BATCH_SIZE


class QueueSettings(Section):
    """The Celery queue on Redis (``WORKER_QUEUE__*``)."""

    name: str = Field("moderation", description="Queue that score jobs go to.")
    visibility_timeout_s: int = Field(
        900,
        ge=5,
        description="Seconds before an unacknowledged job is handed to another worker; must "
        "exceed the longest batch wait + run.",
    )
    restore_interval_s: float = Field(
        10.0, gt=0, description="How often workers sweep for jobs whose visibility expired."
    )
    result_ttl_s: int = Field(
        7 * 24 * 3600,
        ge=60,
        description="How long result documents stay in Redis for `wait` / `worker result`; "
        "also the idempotency window for a job id.",
    )
    max_jobs_per_message: int = Field(
        64,
        ge=1,
        le=4096,
        description="Most jobs one packed message (task `moderation.score_jobs`) may carry; "
        "a message with more, or with none, is dead-lettered whole.",
    )
    max_message_bytes: int = Field(
        32 * 1024 * 1024,
        ge=64 * 1024,
        description="Largest body of a packed message; the client packs within it and sends "
        "a job too large for it as a one-job message.",
    )


class DeliverySettings(Section):
    """Sink delivery retries (``WORKER_DELIVERY__*``)."""

    backoff_base_s: float = Field(
        2.0, gt=0, description="First retry delay; doubles per attempt, with full jitter."
    )
    backoff_max_s: float = Field(600.0, gt=0, description="Longest delay between retries.")
    poll_interval_s: float = Field(
        0.5, gt=0, description="How often a worker looks for deliveries that are due."
    )
    lease_s: float = Field(
        120.0,
        gt=0,
        description="A claimed delivery is retried by another worker if not finished by then.",
    )
    concurrency: int = Field(
        8,
        ge=1,
        le=256,
        description="Deliveries attempted at once per worker, apart from scoring (a slow "
        "endpoint never holds up a batch).",
    )


class MetricsSettings(Section):
    """The worker's HTTP endpoint: /metrics, /livez, /readyz (``WORKER_METRICS__*``)."""

    host: str = Field("0.0.0.0", description="Address the endpoint listens on.")
    port: int = Field(9808, ge=0, le=65535, description="Port; 0 turns the endpoint off.")
    max_connections: int = Field(
        16,
        ge=1,
        le=1024,
        description="Requests served at once; further connections wait in the listen backlog.",
    )
    timeout_s: float = Field(
        5.0,
        gt=0,
        description="A connection that sends no complete request within this is closed.",
    )


class HttpSettings(Section):
    """Outbound HTTP for the http(s) source and the webhook sink (``WORKER_HTTP__*``)."""

    connect_timeout_s: float = Field(5.0, gt=0, description="TCP + TLS connect timeout.")
    read_timeout_s: float = Field(10.0, gt=0, description="Longest wait for the next bytes.")
    total_timeout_s: float = Field(
        30.0, gt=0, description="Cap on a whole image download (slow-drip servers)."
    )
    max_redirects: int = Field(3, ge=0, description="Redirects followed, each re-validated.")
    allow_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs that are reachable although private/loopback/link-local "
        '(e.g. ["10.20.0.0/16"] for an internal image store). Empty: public addresses only.',
    )
    user_agent: str = Field("moderation-worker", description="User-Agent header sent.")

    @field_validator("allow_networks")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        import ipaddress

        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)  # raises ValueError with the reason
        return value


class S3Settings(Section):
    """S3 and S3-compatible stores (``WORKER_S3__*``); credentials: the standard AWS chain."""

    endpoint_url: str | None = Field(
        None, description="For S3-compatible stores (MinIO, Ceph, R2...); default AWS."
    )
    region: str | None = Field(None, description="Region; default from the AWS chain.")
    addressing_style: Literal["auto", "virtual", "path"] = Field(
        "auto", description="Bucket addressing; path for most self-hosted stores."
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="Connect timeout.")
    read_timeout_s: float = Field(30.0, gt=0, description="Read timeout.")


class WebhookSettings(Section):
    """Standard Webhooks signing (``WORKER_WEBHOOK__*``)."""

    secret: SecretStr | None = Field(
        None,
        description="whsec_... signing secret (base64 after the prefix); a sink's own "
        "`secret` option wins.",
    )
    timeout_s: float = Field(10.0, gt=0, description="Connect and read timeout per POST.")


class ImageSettings(Section):
    """Guards on untrusted images (``WORKER_IMAGE__*``)."""

    max_bytes: int = Field(25 * 1024 * 1024, ge=1, description="Largest encoded image.")
    max_pixels: int = Field(
        64_000_000, ge=1, description="Largest width x height (decompression-bomb guard)."
    )
    max_side: int = Field(
        32_768, ge=1, description="Largest width and largest height, read from the header."
    )
    max_aspect_ratio: float = Field(
        50.0,
        ge=1,
        description="Largest long side / short side (a 100000x1 strip is refused before decoding).",
    )
    allowed_formats: list[str] = Field(
        default_factory=lambda: ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"],
        description="Pillow format names accepted; anything else is format_not_allowed.",
    )

    jpeg_draft: bool = Field(
        True,
        description="Decode JPEGs at a reduced DCT scale no smaller than the model input "
        "(much faster on large photos).",
    )
    max_frames: int = Field(
        8,
        ge=1,
        description="Frames scored of an animated GIF/WebP/APNG, spread evenly over it "
        "(1: the first frame only); fewer when frames x canvas would pass max_pixels.",
    )

    @field_validator("allowed_formats")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [v.upper() for v in value]


class StoreSettings(Section):
    """The embedding store (``WORKER_STORE__*``): every scored image's embedding, for
    `worker policies preview`, `worker rescore` and `worker search`."""

    uri: str = Field(
        "",
        description="A directory, s3://bucket/prefix (a fleet of workers on many hosts; "
        "S3 settings and AWS credentials apply) or 'none' to keep no embeddings. Default: "
        "<WORKER_CACHE_DIR>/store.",
    )
    batch_rows: int = Field(
        512, ge=1, le=100_000, description="Most rows one background commit writes."
    )
    flush_interval_s: float = Field(
        1.0, gt=0, description="Longest time a scored image's row waits to be committed."
    )
    max_pending_rows: int = Field(
        20_000,
        ge=1,
        description="Rows waiting for the store at most; beyond it (store down for long) "
        "new rows are dropped and counted, never the jobs.",
    )


class Settings(BaseSettings):
    """Everything moderation-worker can be told. See docs/operations.md for the full table."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="ignore",
        validate_default=True,
    )

    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL of the queue.")
    policy_dir: Path = Field(
        SHIPPED_POLICY_DIR, description="Directory of policy YAML files (*.yaml, *.yml)."
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Prompt-embedding and image-embedding caches, and the embedding store "
        "unless WORKER_STORE__URI says otherwise.",
    )
    model: ModelSettings = Field(default_factory=ModelSettings)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="Autocast dtype for image encoding; auto = fp16 on CUDA, else fp32."
    )
    batch: BatchSettings = Field(default_factory=BatchSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    max_attempts: int = Field(
        5,
        ge=1,
        description="Tries per job (scoring) and per sink delivery before the dead-letter store.",
    )
    image: ImageSettings = Field(default_factory=ImageSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    sink_roots: list[Path] = Field(
        default_factory=list,
        description="Directories under which a job may name a `local` sink in a queue worker; "
        "none by default (jobs then cannot write local files). Default sinks from "
        "WORKER_SINKS are trusted and not limited.",
    )
    job_sink_types: list[str] | None = Field(
        None,
        description="Sink types a job may name in its own `sinks` (default: every installed "
        "sink); any other makes the job's result the error `sink_not_allowed`.",
    )
    secret_key: SecretStr | None = Field(
        None,
        description="Fernet key (`worker secrets keygen`) sealing job secrets and presigned "
        "URLs kept in Redis for retries and dead letters; without it they are redacted and such "
        "entries cannot be retried.",
    )
    file_roots: list[Path] = Field(
        default_factory=list,
        description="Directories a queue worker may read local paths from; none by default. "
        "`worker classify` reads any path it is given.",
    )
    torch_compile: bool = Field(
        False, description="torch.compile the image tower (slower start, faster on some GPUs)."
    )
    decode_workers: int = Field(
        0, ge=0, description="Threads decoding and preprocessing images; 0 = one per core."
    )
    sinks: list[str] = Field(
        default_factory=list,
        description="Default sinks as TYPE:TARGET[,key=value...] specs, used when a job "
        "names none.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto = console on a TTY, JSON lines otherwise."
    )
    task_events: bool = Field(
        True,
        description="`worker serve` sends Celery task events, one set per job (uuid = job "
        "id), for `celery events` and Flower (`-E`); false turns them off.",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in {"auto", "cpu", "cuda", "mps"}:
            return value
        if value.startswith("cuda:") and value[5:].isdigit():
            return value
        raise ValueError("must be auto, cpu, cuda, cuda:N or mps")


def env_name(loc: tuple[int | str, ...]) -> str:
    """The environment variable that sets the field at ``loc`` (``('model','name')`` ->
    ``WORKER_MODEL__NAME``)."""
    parts = [str(p).upper() for p in loc if not isinstance(p, int)]
    return ENV_PREFIX + "__".join(parts)


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Read settings from the environment and, optionally, a TOML file.

    ``config_file`` (or ``WORKER_CONFIG_FILE``) names a TOML file whose keys mirror the
    setting names (``[model]`` table for ``WORKER_MODEL__*``). Invalid values raise
    :class:`ConfigurationError` naming the environment variable to fix.
    """
    path_value = config_file or os.environ.get(CONFIG_FILE_ENV)
    settings_cls: type[Settings] = Settings
    if path_value:
        path = Path(path_value)
        if not path.is_file():
            raise ConfigurationError(
                f"config file {path} does not exist (set by --config or {CONFIG_FILE_ENV})"
            )
        if path.suffix.lower() != ".toml":
            raise ConfigurationError(f"config file {path} must be TOML (*.toml)")

        class _FileSettings(Settings):
            @classmethod
            def settings_customise_sources(
                cls,
                settings_cls: type[BaseSettings],
                init_settings: PydanticBaseSettingsSource,
                env_settings: PydanticBaseSettingsSource,
                dotenv_settings: PydanticBaseSettingsSource,
                file_secret_settings: PydanticBaseSettingsSource,
            ) -> tuple[PydanticBaseSettingsSource, ...]:
                return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, path))

        settings_cls = _FileSettings
    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        lines = [f"{env_name(err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigurationError("invalid settings:\n  " + "\n  ".join(lines)) from None
