"""structlog setup for every process: JSON when not on a terminal, console on a terminal."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

SECRET_KEYS = ("token", "secret", "authorization", "password")


def _drop_secrets(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # Belt and braces: no key that looks like a credential ever reaches a log line.
    for key in list(event):
        if any(s in key.lower() for s in SECRET_KEYS):
            event[key] = "**********"
    return event


def configure(*, log_format: str = "auto", level: str = "INFO", stream: Any = None) -> None:
    out = stream or sys.stderr
    console = log_format == "console" or (log_format == "auto" and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if console
        else structlog.processors.JSONRenderer()
    )
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    # arq, uvicorn and alembic log through the standard library: keep them quiet and plain.
    logging.basicConfig(
        level=max(numeric, logging.WARNING), stream=out, format="%(name)s %(levelname)s %(message)s"
    )
    logging.getLogger("arq").setLevel(max(numeric, logging.WARNING))
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
