"""structlog configured for JSON lines on stdout (journald captures stdout under systemd)."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure(level: str = "info", *, node: str | None = None, stream=None) -> None:  # type: ignore[no-untyped-def]
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if node:
        processors.insert(0, _add_node(node))
    processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


def _add_node(node: str) -> structlog.types.Processor:
    def add(logger: object, name: str,
            event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("node", node)
        return event

    return add
