"""`worker ARGS…` in this process: typer's CliRunner against the real `worker` app.

What unit tests use instead of a subprocess (`tests.processes` is for integration tests).
The result has the fields of a finished subprocess (``returncode``, ``stdout``,
``stderr``), so a test reads the same either way.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import structlog
from typer.testing import CliRunner

from worker.cli import app


@dataclass(frozen=True)
class CliResult:
    """How `worker ARGS…` ended: its exit code and what it wrote to stdout and stderr."""

    returncode: int
    stdout: str
    stderr: str


@contextmanager
def logging_restored() -> Iterator[None]:
    """Put structlog's configuration and the root logger back afterwards (a command that
    loads its settings points both at the stderr CliRunner captures)."""
    saved_structlog = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        yield
    finally:
        structlog.configure(**saved_structlog)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def run_cli(*args: str, env: Mapping[str, str] | None = None) -> CliResult:
    """`worker ARGS…` with ``env`` added to the environment while it runs.

    An exception that escapes the app (a subprocess would die with a traceback) fails the
    test with that traceback; exits, including error exits, are results.
    """
    with logging_restored():
        result = CliRunner().invoke(app, list(args), env=dict(env) if env is not None else None)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        trace = "".join(traceback.format_exception(result.exception))
        raise AssertionError(
            f"`worker {' '.join(args)}` raised {result.exception!r}:\n{trace}\n{result.output}"
        )
    return CliResult(result.exit_code, result.stdout, result.stderr)
