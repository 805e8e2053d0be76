"""structlog set-up: JSON key-value events on stderr (one line each, for a log collector), or, for a person
watching a terminal (`canvaswatch demo`), the same events as plain `level event key=value` lines."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str = "info", human: bool = False) -> None:
    numeric = getattr(logging, level.upper())
    renderer = (structlog.dev.ConsoleRenderer(colors=False) if human
                else structlog.processors.JSONRenderer())
    logging.basicConfig(stream=sys.stderr, level=numeric, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=False,
    )


class _CurrentStderr:
    """Writes to whatever sys.stderr is now, not the stream bound at configure time
    (a test harness or a daemoniser may replace and close the original)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()
