"""structlog set-up: JSON lines (or console when a TTY), secrets never logged."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_MARKERS = ("token", "api_key", "apikey", "authorization", "password", "secret", "cookie")
_ALLOWED = frozenset({"tokens_in", "tokens_out", "max_tokens"})


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        lowered = key.lower()
        if lowered in _ALLOWED:
            continue
        if any(marker in lowered for marker in _SECRET_MARKERS):
            event[key] = "[redacted]"
    return event


# Credentials in a URL (scheme://user:pass@host): an upstream or proxy URL in an error text.
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]*@")
# C0 and C1 controls and DEL: a terminal would act on them (clear the screen, fake a line).
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROLS_BUT_NL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def _escaped(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def redact_url_credentials(text: str) -> str:
    """``http://user:pass@host/`` -> ``http://[redacted]@host/``."""
    return _URL_CREDENTIALS.sub(r"\1[redacted]@", text)


def escape_controls(text: str) -> str:
    """Control characters as Python escapes (``\\x1b``, ``\\n``): one event, one line."""
    return _CONTROLS.sub(_escaped, text)


def _scrub_urls(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str) and "@" in value:
            event[key] = redact_url_credentials(value)
    return event


def _escape_for_console(
    _: Any, __: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # JSON lines escape controls already; the console renderer prints strings raw (other
    # values through repr, which escapes). A traceback keeps its line breaks.
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = (
                _CONTROLS_BUT_NL.sub(_escaped, value)
                if key == "exception"
                else _CONTROLS.sub(_escaped, value)
            )
    return event


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and the stdlib root logger once per entry point."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            _scrub_urls,
            *([] if use_json else [_escape_for_console]),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries (hypercorn, httpx) log through the stdlib: keep them quiet but visible, in
    # the same format and through the same redaction and escaping as our own lines.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                _redact,
                structlog.processors.format_exc_info,
                _scrub_urls,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *([] if use_json else [_escape_for_console]),
                renderer,
            ],
        )
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), handlers=[handler], force=True)


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger
