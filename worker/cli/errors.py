"""Error exits of the `worker` command line: an exception -> one line on stderr + exit code.

Every mistake a user can make at the command line (a bad setting, a bad option, Redis not
reachable, a missing file, a bad ``--sink`` spec) ends the command with one line on
stderr that names the fix and exit code 2; never with a traceback. :class:`CliGroup` does
this for the whole `worker` app, :func:`describe` decides what is the user's doing.

Anything else is a bug: one line ``internal error: …`` and exit code 1, or the full
traceback with ``--log-level debug``, ``WORKER_LOG_LEVEL=debug`` or ``WORKER_TRACEBACK=1``.
"""

from __future__ import annotations

import errno
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.markup import escape
from typer.core import TyperGroup

from worker.about import SERVE_HINT, missing_serve_module
from worker.cli.common import (
    EXIT_CONFIG,
    EXIT_FAILED,
    TRACEBACK_ENV,
    State,
    debugging,
    one_line,
    redis_unreachable,
    stderr,
)
from worker.errors import ConfigurationError, ModelLoadError, PolicyError, WorkerError
from worker.redact import redact_text as redact

#: Most problem lines printed for one error (policy or data problems); the rest are counted.
MAX_PROBLEM_LINES = 20


def _bounded(header: str | None, problems: list[str]) -> list[str]:
    lines = [header] if header else []
    lines += [("  " if header else "") + p for p in problems[:MAX_PROBLEM_LINES]]
    if len(problems) > MAX_PROBLEM_LINES:
        lines.append(f"… and {len(problems) - MAX_PROBLEM_LINES} more")
    return lines


def _os_error(exc: OSError) -> str:
    name = exc.filename if exc.filename is not None else None
    shown = f"{name}" if name is not None else ""
    if isinstance(exc, FileNotFoundError) and shown:
        return f"no such file or directory: {shown}"
    if isinstance(exc, PermissionError) and shown:
        return f"permission denied: {shown} (check its owner and mode)"
    if isinstance(exc, IsADirectoryError) and shown:
        return f"{shown} is a directory; give a file"
    if isinstance(exc, NotADirectoryError) and shown:
        return f"{shown}: a part of this path is not a directory"
    if isinstance(exc, FileExistsError) and shown:
        return f"{shown} already exists"
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device{' writing ' + shown if shown else ''}"
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{reason}: {shown}" if shown else reason


def _validation_error(exc: Any) -> str:
    """A pydantic ValidationError in one line, without the input values (they may hold
    secrets)."""
    problems = [
        f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors()
    ]
    return f"invalid {exc.title}: {'; '.join(problems)}"


def _broker_url() -> str:
    settings = State.current.loaded if State.current is not None else None
    return settings.broker_url if settings is not None else "WORKER_BROKER_URL"


def describe(exc: BaseException) -> tuple[int, list[str]] | None:
    """(exit code, lines to print) for an error the user caused and can fix; None for a
    programmer error. The lines are not yet redacted."""
    import pydantic
    import redis
    from kombu.exceptions import OperationalError

    from worker.errors import DataError

    if (module := missing_serve_module(exc)) is not None:
        return EXIT_CONFIG, [
            f"this command needs the model stack, which is not installed here (no module "
            f"named {module!r}): {SERVE_HINT}"
        ]
    if isinstance(exc, PolicyError):
        return EXIT_CONFIG, _bounded(None, [str(p) for p in exc.problems])
    if isinstance(exc, ConfigurationError | ModelLoadError):
        return EXIT_CONFIG, [one_line(str(exc))]
    if isinstance(exc, DataError):  # the data checks of eval / finetune: "checks failed"
        return EXIT_FAILED, _bounded(f"{len(exc.problems)} problem(s) in the data:", exc.problems)
    if isinstance(exc, WorkerError):
        return EXIT_FAILED, [one_line(str(exc))]
    if isinstance(exc, typer.TyperException):  # click's usage errors, typer.BadParameter
        message = one_line(exc.format_message())
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        return EXIT_CONFIG, [message + hint]
    if isinstance(exc, pydantic.ValidationError):
        return EXIT_CONFIG, [_validation_error(exc)]
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError | OperationalError):
        return EXIT_CONFIG, [str(redis_unreachable(_broker_url(), exc))]
    if isinstance(exc, redis.RedisError):
        return EXIT_CONFIG, [f"Redis at {_broker_url()} answered an error: {one_line(str(exc))}"]
    if isinstance(exc, tomllib.TOMLDecodeError):
        return EXIT_CONFIG, [f"invalid TOML: {exc}"]
    if isinstance(exc, UnicodeDecodeError):
        return EXIT_CONFIG, [f"a file is not UTF-8 text: {exc.reason} at byte {exc.start}"]
    if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):
        return EXIT_CONFIG, [_os_error(exc)]
    return None


def _print_error(lines: list[str]) -> None:
    """``error LINE`` per line; indented lines continue the one before, unprefixed."""
    for line in lines:
        prefix = "" if line[:1].isspace() else "[red]error[/red] "
        stderr.print(prefix + escape(redact(line)), soft_wrap=True)


def fail(message: str, code: int = EXIT_CONFIG) -> NoReturn:
    """Print ``error MESSAGE`` (one line, redacted) and exit with ``code``."""
    _print_error([one_line(message)])
    raise typer.Exit(code)


def _is_signal(exc: BaseException) -> bool:
    """Exceptions that steer click itself (exit, abort, show help) pass through."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return isinstance(exc, typer.Exit | typer.Abort) or "NoArgsIsHelpError" in names


def handle(exc: Exception, debug: bool) -> NoReturn:
    """Print ``exc`` as the user should see it and exit; re-raise what is not ours."""
    if _is_signal(exc) or isinstance(exc, BrokenPipeError):
        raise exc
    described = describe(exc)
    if described is not None:
        code, lines = described
        _print_error(lines)
        raise typer.Exit(code) from None
    if debug:
        raise exc
    message = redact(one_line(str(exc)))
    stderr.print(
        f"[red]internal error[/red]: {escape(type(exc).__name__)}"
        f"{': ' + escape(message) if message else ''} "
        f"(run with --log-level debug or {TRACEBACK_ENV}=1 for the traceback)",
        soft_wrap=True,
    )
    raise typer.Exit(EXIT_FAILED) from None


@contextmanager
def exits_on_errors() -> Iterator[None]:
    """Turn errors the user can fix into a message on stderr and a non-zero exit (the same
    as :class:`CliGroup` does for the whole app; kept for code run outside it)."""
    try:
        yield
    except Exception as exc:
        if _is_signal(exc) or describe(exc) is None:
            raise
        handle(exc, debug=False)


class CliGroup(TyperGroup):
    """The root `worker` group: every error raised while parsing or running a command goes
    through :func:`handle`, in the real CLI and under typer's CliRunner alike."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any
    ) -> Any:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except Exception as exc:  # `worker --bogus`, `worker --log-level`
            handle(exc, debug=False)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            found = ctx.find_object(State)
            handle(exc, debug=found.debug if found is not None else debugging())


def require_exists(path: Path, option: str) -> None:
    """Exit 2 naming ``option`` when ``path`` does not exist."""
    if not path.exists():
        fail(f"{option} {path} does not exist")
