"""What every command shares: settings from the root options, consoles, exit codes, Redis.

Settings are read once, on first use, and every way reading them can fail becomes one
``ConfigurationError`` line that names the variable or file to fix. How an error ends a
command (one line on stderr and an exit code) is in ``worker.cli.errors``.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar

import typer
from pydantic_settings import SettingsError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from worker.errors import ConfigurationError, WorkerError
from worker.log import configure_logging
from worker.redact import REDACTED, secret_values
from worker.redact import redact_text as redact
from worker.settings import CONFIG_FILE_ENV, ENV_PREFIX, Settings, load_settings

stderr = Console(stderr=True, highlight=False)

#: Exit codes: 0 done, 1 the work itself failed (no image readable, checks failed),
#: 2 bad configuration, policy, model, option or environment (nothing was attempted).
EXIT_FAILED = 1
EXIT_CONFIG = 2

#: Set to 1 to get the traceback of an internal error (as ``--log-level debug`` does).
TRACEBACK_ENV = "WORKER_TRACEBACK"
#: How long the pre-flight Redis ping may take before the command gives up.
REDIS_PING_TIMEOUT_S = 3.0


def parse_sink_specs(specs: list[str]) -> list[dict[str, Any]]:
    """``--sink TYPE:TARGET[,key=value…]`` specs -> sink configs. A bad spec is a
    PluginError whose message never repeats a ``secret=`` / ``token=`` / ``password=`` /
    ``key=`` value of the spec."""
    from worker.errors import PluginError
    from worker.plugins import parse_sink_spec, validate_sink_config

    configs = []
    for spec in specs:
        try:
            config = parse_sink_spec(spec)
            validate_sink_config(config)
        except (WorkerError, ValueError) as exc:
            message = redact(one_line(str(exc)))
            for value in secret_values(spec):
                message = message.replace(value, REDACTED)
            shown = redact(spec)
            where = "" if shown in message else f" (in --sink {shown})"
            raise PluginError(message + where) from None
        configs.append(config)
    return configs


def one_line(text: str) -> str:
    """Newlines and the indentation after them become ``; ``."""
    parts = [p.strip() for p in str(text).splitlines() if p.strip()]
    return "; ".join(parts).replace(":; ", ": ")


class State:
    """Root options, turned into settings once, on first use."""

    #: The state of the command running now (the last one made), for error messages.
    current: ClassVar[State | None] = None

    def __init__(self, config: Path | None, log_level: str | None) -> None:
        self.config = config
        self.log_level = log_level
        self._settings: Settings | None = None
        State.current = self

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            overrides = {"log_level": self.log_level} if self.log_level else {}
            self._settings = _load_settings(self.config, overrides)
            configure_logging(self._settings.log_level, self._settings.log_format)
        return self._settings

    @property
    def loaded(self) -> Settings | None:
        """The settings if they were read already (never reads them)."""
        return self._settings

    @property
    def debug(self) -> bool:
        """Whether internal errors show their traceback."""
        level = self._settings.log_level if self._settings is not None else self.log_level
        return debugging(level)


def debugging(log_level: str | None = None) -> bool:
    """``WORKER_TRACEBACK=1``, or the log level (``--log-level``, else WORKER_LOG_LEVEL)
    is debug."""
    if os.environ.get(TRACEBACK_ENV, "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    level = log_level or os.environ.get(f"{ENV_PREFIX}LOG_LEVEL", "")
    return level.strip().lower() == "debug"


def _config_path(config: Path | None) -> str | None:
    return str(config) if config else os.environ.get(CONFIG_FILE_ENV) or None


def _load_settings(config: Path | None, overrides: dict[str, Any]) -> Settings:
    """:func:`load_settings` with every way it can fail turned into a one-line
    ConfigurationError that names the variable (or config file) to fix."""
    path = _config_path(config)
    where = f" or {path}" if path else ""
    try:
        return load_settings(config, **overrides)
    except ConfigurationError as exc:
        message = str(exc)
        if not message.startswith("invalid settings:"):
            raise ConfigurationError(one_line(message)) from None
        problems = [
            line.strip().replace(": Value error, ", ": ")
            for line in message.splitlines()[1:]
            if line.strip()
        ]
        fix = "fix the environment variable" + ("s" if len(problems) > 1 else "") + where
        raise ConfigurationError(f"invalid settings: {'; '.join(problems)} ({fix})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(
            f"config file {path} is not valid TOML: {exc} (fix it, or leave out --config / "
            f"{CONFIG_FILE_ENV})"
        ) from None
    except UnicodeDecodeError:
        raise ConfigurationError(
            f"config file {path} is not UTF-8 text (give a TOML file)"
        ) from None
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read config file {path}: {exc.strerror or exc} (set --config or "
            f"{CONFIG_FILE_ENV})"
        ) from None
    except SettingsError as exc:  # a list or table setting that is not JSON
        raise ConfigurationError(_settings_error(exc, path)) from None


def _settings_error(exc: Exception, path: str | None) -> str:
    """pydantic-settings' 'error parsing value for field "x" from source "…"' (a list or
    table setting that is not JSON) -> which variable to fix and how."""
    found = re.search(r'field "([^"]+)" from source "([^"]+)"', str(exc))
    if found is None:
        return f"invalid settings: {one_line(str(exc))}"
    field, source = found.groups()
    detail = f": {exc.__cause__}" if exc.__cause__ else ""
    if "Env" not in source:
        return f"invalid settings: cannot parse {field!r} in {path or 'the config file'}{detail}"
    name = f"{ENV_PREFIX}{field.upper()}"
    named = sorted(k for k in os.environ if k == name or k.startswith(f"{name}__")) or [name]
    return (
        f"invalid settings: {' / '.join(named)} is not valid JSON{detail} "
        "(lists and tables are JSON, e.g. '[\"/srv/images\"]')"
    )


def state(ctx: typer.Context) -> State:
    found = ctx.find_object(State)
    if found is None:  # called outside the root app (tests invoking a sub-app)
        found = State(None, None)
        ctx.obj = found
    return found


# ---------------------------------------------------------------------- Redis


def redis_unreachable(
    url: str, reason: object, setting: str = "WORKER_BROKER_URL"
) -> ConfigurationError:
    return ConfigurationError(
        f"cannot reach Redis at {redact(url)}: {one_line(str(reason)) or type(reason).__name__} "
        f"(set {setting})"
    )


def require_redis(
    url: str, setting: str = "WORKER_BROKER_URL", timeout_s: float = REDIS_PING_TIMEOUT_S
) -> None:
    """Ping Redis once with a short timeout, before Celery (which retries for ever) or a
    store is involved; ConfigurationError naming ``setting`` when it fails."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    try:
        client = redis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
    except ValueError as exc:  # not a redis://, rediss:// or unix:// URL
        raise ConfigurationError(f"{setting}={redact(url)} is not a Redis URL: {exc}") from None
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise redis_unreachable(url, exc, setting) from None
    finally:
        client.close()


def require_broker(ctx: typer.Context) -> Settings:
    """The settings, once their broker answers a ping."""
    settings = state(ctx).settings
    require_redis(settings.broker_url)
    return settings


#: ``--data`` of `worker eval` and `worker finetune`: the same labelled-data layouts.
DataOption = Annotated[
    Path,
    typer.Option(
        "--data",
        "-d",
        help="Labelled images: a folder per class (a 'none' folder for negatives), or CSV/JSONL "
        "with image,label[,split] (labels ';'-separated; empty = none).",
    ),
]


def progress_bar(info: bool = False, transient: bool = True) -> Progress:
    """The project's progress bar on stderr: description, bar, n/total, [info field], time."""
    extra = [TextColumn("{task.fields[info]}")] if info else []
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
        TimeElapsedColumn(),
        console=stderr,
        transient=transient,
    )
