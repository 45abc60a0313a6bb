"""The plugin interfaces (sinks and sources) and the registry that finds them.

Plugins are found through entry points only: the built-in ones in ``adapters/`` are
registered in this project's ``pyproject.toml`` exactly as a third-party package registers
its own, in the groups ``moderation_worker.sinks`` and ``moderation_worker.sources``.

A sink::

    class MySink(Sink):
        name = "my-sink"
        class Options(BaseModel):           # validated at start-up
            url: str
        def __init__(self, options: Options, context: PluginContext) -> None: ...
        def deliver(self, result: Result) -> None: ...   # raise Retryable/PermanentSinkError

A source::

    class MySource(Source):
        schemes = ("myscheme",)
        def fetch(self, uri: str) -> bytes: ...           # raise SourceError(code=...)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from worker.documents import DECISION_ACTIONS, Result
from worker.errors import PluginError
from worker.redact import redact_text

SINK_GROUP = "moderation_worker.sinks"
SOURCE_GROUP = "moderation_worker.sources"
#: The option every sink takes, whatever its plugin: the decisions it receives.
ROUTE_OPTION = "when"


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PluginState(Protocol):
    """Small key -> text state a plugin keeps across the workers of a deployment (a queue
    worker gives one in Redis; ``worker classify`` gives none)."""

    def get(self, key: str) -> str | None: ...
    def set(self, key: str, value: str) -> None: ...
    def delete(self, key: str) -> None: ...


@dataclass
class PluginContext:
    """Values from settings that plugins may need, passed down (plugins never read env)."""

    settings: Any  # worker.settings.Settings; typed loosely to keep plugins importable alone
    #: True in a queue worker: local paths are then limited to ``settings.file_roots``.
    service: bool = False
    #: Shared state across workers, when there is any (None under ``worker classify``).
    state: PluginState | None = None


class Sink(ABC):
    """Writes one result somewhere. Must be idempotent per ``job_id``."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    #: The option that TARGET fills in a ``TYPE:TARGET[,key=value...]`` spec.
    target_option: ClassVar[str | None] = None

    def __init__(self, options: Any, context: PluginContext) -> None:
        self.options = options
        self.context = context

    @classmethod
    def job_option_problem(cls, options: Any, context: PluginContext) -> str | None:
        """Why a *job* may not use these (validated) options, or None. Sinks that write
        where a job could choose (paths, hosts) override this with the settings' limits;
        sinks from settings (``WORKER_SINKS``, ``--sink``) are trusted and not asked."""
        return None

    @abstractmethod
    def deliver(self, result: Result) -> None:
        """Deliver ``result``; raise RetryableSinkError or PermanentSinkError on failure."""

    def close(self) -> None:
        """Release connections and files."""


class Source(ABC):
    """Fetches image bytes for the URI schemes it declares."""

    schemes: ClassVar[tuple[str, ...]]

    def __init__(self, context: PluginContext) -> None:
        self.context = context

    @abstractmethod
    def fetch(self, uri: str) -> bytes:
        """The bytes at ``uri``; raise SourceError with a stable code on failure."""

    def close(self) -> None:
        """Release connections."""


def _entry_points(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def available_sinks() -> dict[str, EntryPoint]:
    return _entry_points(SINK_GROUP)


def available_sources() -> dict[str, EntryPoint]:
    return _entry_points(SOURCE_GROUP)


def _load(group: str, name: str, base: type) -> Any:
    found = _entry_points(group)
    if name not in found:
        known = ", ".join(sorted(found)) or "none installed"
        raise PluginError(f"unknown {group.rsplit('.', 1)[1][:-1]} {name!r} (known: {known})")
    try:
        cls = found[name].load()
    except Exception as exc:
        raise PluginError(f"plugin {name!r} ({found[name].value}) failed to import: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(f"plugin {name!r} ({found[name].value}) is not a {base.__name__}")
    return cls


def sink_class(name: str) -> type[Sink]:
    cls: type[Sink] = _load(SINK_GROUP, name, Sink)
    return cls


def source_class(name: str) -> type[Source]:
    cls: type[Source] = _load(SOURCE_GROUP, name, Source)
    return cls


def route_of(config: dict[str, Any]) -> frozenset[str] | None:
    """The decisions a sink config receives (``when=review|block``), None for all of them;
    PluginError when ``when`` names anything else."""
    value = config.get(ROUTE_OPTION)
    if value is None:
        return None
    if isinstance(value, str):
        parts: list[Any] = value.split("|")
    else:  # a job's JSON may give a list; anything else is shown in the error
        parts = value if isinstance(value, list) and value else [value]
    actions = [p.strip() if isinstance(p, str) else p for p in parts]
    wrong = [a for a in actions if a not in DECISION_ACTIONS]
    if wrong:
        raise PluginError(
            f"bad option for sink {str(config.get('type'))[:64]!r}: when={_shown(wrong[0])} is not "
            f"a decision; give {' | '.join(DECISION_ACTIONS)}, several separated by '|' "
            "(e.g. when=review|block)"
        )
    return frozenset(actions)


def routes_to(config: dict[str, Any], result: Result) -> bool:
    """Whether ``result`` goes to the sink ``config`` describes: every result without
    ``when``; with it, an ok result whose decision it names (an error result has no
    decision, so it only reaches sinks without ``when``)."""
    when = route_of(config)
    return when is None or (result.decision is not None and result.decision.action in when)


def plugin_options(config: dict[str, Any]) -> dict[str, Any]:
    """A sink config's options for its plugin: all but ``type`` and ``when`` (the worker's)."""
    return {k: v for k, v in config.items() if k not in {"type", ROUTE_OPTION}}


def _shown(value: Any) -> str:
    return redact_text(repr(value))[:80]


def make_sink(name: str, options: dict[str, Any], context: PluginContext) -> Sink:
    """Instantiate sink ``name`` with validated options; PluginError explains what is wrong.
    ``when`` is the worker's routing option (see :func:`routes_to`), not the plugin's."""
    cls = sink_class(name)
    route_of(options | {"type": name})
    return cls(_parse_options(cls, name, plugin_options(options)), context)


def parse_sink_spec(spec: str) -> dict[str, Any]:
    """``TYPE:TARGET[,key=value...]`` -> sink config ``{"type": TYPE, target_option: TARGET, ...}``.

    ``s3:s3://bucket/prefix/``, ``webhook:https://host/hook,secret=whsec_...``,
    ``local:results.jsonl``. Unknown types and options fail here, at start-up.
    """
    kind, sep, rest = spec.partition(":")
    if not sep or not kind:
        raise PluginError(
            f"sink spec {redact_text(spec)!r} must look like TYPE:TARGET[,key=value...]"
        )
    cls = sink_class(kind)
    target, *pairs = rest.split(",") if rest else [""]
    config: dict[str, Any] = {"type": kind}
    if target:
        if cls.target_option is None:
            raise PluginError(f"sink {kind!r} takes no TARGET; use {kind}:,key=value")
        config[cls.target_option] = target
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            raise PluginError(
                f"sink spec {redact_text(spec)!r}: {redact_text(pair)!r} is not key=value"
            )
        config[key.strip()] = value
    return config


def validate_sink_config(config: dict[str, Any]) -> None:
    """Raise PluginError if ``config`` names an unknown sink or has bad options."""
    cls = sink_class(str(config.get("type", "")))
    route_of(config)
    _parse_options(cls, config["type"], plugin_options(config))


def _parse_options(cls: type[Sink], name: str, options: dict[str, Any]) -> BaseModel:
    try:
        return cls.Options.model_validate(options)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg']}" for e in exc.errors()
        )
        raise PluginError(f"bad options for sink {name!r}: {problems}") from None


def job_sink_problem(
    config: dict[str, Any], context: PluginContext, allowed_types: Sequence[str] | None
) -> str | None:
    """Why a job may not deliver to ``config``, or None: the type must be installed and
    allowed, the options valid, and the sink's own limits met (e.g. local roots)."""
    name = str(config.get("type", ""))
    installed = available_sinks()
    if name not in installed:
        return f"unknown sink type {name[:64]!r} (installed: {', '.join(sorted(installed))})"
    if allowed_types is not None and name not in allowed_types:
        return (
            f"sink type {name!r} is not allowed in jobs (WORKER_JOB_SINK_TYPES: "
            f"{', '.join(allowed_types) or 'none'})"
        )
    try:
        cls = sink_class(name)
        route_of(config)
        options = _parse_options(cls, name, plugin_options(config))
    except PluginError as exc:
        return redact_text(str(exc))
    return cls.job_option_problem(options, context)


def make_sources(context: PluginContext) -> dict[str, Source]:
    """Every installed source, by URI scheme."""
    by_scheme: dict[str, Source] = {}
    for name in sorted(available_sources()):
        source = source_class(name)(context)
        for scheme in source.schemes:
            by_scheme.setdefault(scheme, source)
    return by_scheme
