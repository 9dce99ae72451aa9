"""The one place that configures structlog.

JSON lines when stdout is not a terminal (journald collects them), coloured key/value lines on
a terminal. Modules log with ``structlog.get_logger(__name__)``; a turn binds ``turn_id`` through
``structlog.contextvars`` so every line of a turn carries it, whichever module writes it.

What people say and what the device answers is logged only at DEBUG: journald keeps logs for
weeks, so a transcript at INFO would outlive ``DELETE /v1/sessions``. Call sites log lengths at
INFO; `redact_private` is the net under them for any field named like words of a conversation.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

# fields that carry a person's words or the device's reply to them
PRIVATE_FIELDS = frozenset({"text", "transcript", "reply", "content", "prompt", "messages",
                            "question", "answer", "utterance", "label", "frame", "summary"})


def redact_private(logger: object, method_name: str, event_dict: dict) -> dict:
    """Above DEBUG, replace conversation fields by their length (still useful to debug)."""
    if method_name == "debug":
        return event_dict
    for key in PRIVATE_FIELDS & event_dict.keys():
        value = event_dict[key]
        size = len(value) if isinstance(value, str | list | tuple | dict) else None
        event_dict[key] = f"<redacted: {size} chars>" if isinstance(value, str) else (
            f"<redacted: {size} items>" if size is not None else "<redacted>")
    return event_dict


def configure_logging(
    level: str = "info", fmt: Literal["auto", "json", "console"] = "auto", stream=None
) -> None:
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            redact_private,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries that use stdlib logging (aiohttp, websockets) go to the same stream, quietly.
    logging.basicConfig(level=max(_LEVELS[level], logging.WARNING), stream=stream,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
