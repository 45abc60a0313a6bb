"""Logging set-up: one format per run, JSON lines when stderr is not a TTY, console otherwise.

Events are ``noun.past_verb`` with fields (``log.info("job.scored", job_id=..., ms=...)``).

Our structlog events are rendered by structlog straight to stderr (a per-job event costs
no trip through the stdlib's logging machinery); the stdlib records of Celery, kombu,
boto3, urllib3 and Python's warnings (``py.warnings``) go through one handler on the root
logger whose ``structlog.stdlib.ProcessorFormatter`` renders them with the same renderer.
So a run writes either JSON lines or console lines to stderr, never a mix of both.
Third-party loggers stay at WARNING (their INFO chatter repeats our own events).
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR

_json = False


def configure_logging(
    level: str = "info", fmt: Literal["auto", "json", "console"] = "auto"
) -> None:
    """Point structlog and every stdlib logger at stderr, in one format.

    ``fmt="auto"`` is JSON lines unless stderr is a terminal. Called again (the CLI, then
    the Celery worker's signal), it replaces the earlier set-up instead of adding to it.
    """
    global _json  # noqa: PLW0603
    numeric = _LEVELS.get(level, logging.INFO)
    _json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if _json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    # The console renderer formats exceptions itself; JSON gets them as a string field.
    exceptions: list[structlog.types.Processor] = (
        [structlog.processors.format_exc_info] if _json else []
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.StackInfoRenderer(),
            *exceptions,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
                *exceptions,
            ],
        )
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    # Third-party libraries log through the stdlib; keep them quiet unless asked.
    root.setLevel(max(numeric, logging.WARNING))
    # warnings.warn(...) -> py.warnings -> the same handler. Off first: captureWarnings(True)
    # does nothing when it thinks it is already on, even if showwarning was replaced since.
    logging.captureWarnings(False)
    logging.captureWarnings(True)


def json_logging() -> bool:
    """Whether the last :func:`configure_logging` chose JSON lines."""
    return _json


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
