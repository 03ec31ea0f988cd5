"""How a route family writes what the relay adds to an answer: OpenAI's way by default.

No I/O. The ``ResponseMachine`` asks its ``Wire`` how to count a stream's tokens, read a
whole answer's usage, and word an error: as the body of an answer the broker makes
(before any byte went out) or inside a stream that already began. ``Wire`` is OpenAI's
(SSE, its error envelope, ``usage``); ``broker.core.ndjson_usage.OllamaWire`` is Ollama's
native API (NDJSON, ``{"error": "..."}``, ``prompt_eval_count`` / ``eval_count``).
"""

from __future__ import annotations

import json
import re
from typing import Protocol

from broker.core.errors import BrokerError
from broker.core.sse_usage import StreamUsage, estimate_completion_tokens
from shared.errors import normalize_error_body

__all__ = ["DONE_EVENT", "TAIL_BYTES", "UsageCounter", "Wire", "extract_tokens", "sse_event"]

DONE_EVENT = b"data: [DONE]\n\n"
_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
TAIL_BYTES = 4096


def extract_tokens(tail: bytes) -> tuple[int | None, int | None]:
    """(prompt tokens, completion tokens) from the last usage object in ``tail``."""
    prompt = _PROMPT.findall(tail)
    completion = _COMPLETION.findall(tail)
    return (
        int(prompt[-1]) if prompt else None,
        int(completion[-1]) if completion else None,
    )


class UsageCounter(Protocol):
    """Follows one streamed answer: the bytes to pass on, and its token counts."""

    tokens_in: int | None
    tokens_out: int | None
    deltas: int  # events or lines that carried a generated token (the estimate)

    @property
    def exact(self) -> bool: ...
    def feed(self, chunk: bytes) -> bytes: ...
    def finish(self) -> bytes: ...


def sse_event(body: bytes, tail: bytes) -> bytes:
    """An SSE data event (after a blank line if the stream stopped mid-event) and [DONE]."""
    prefix = b"" if not tail or tail.endswith(b"\n\n") else b"\n\n"
    return prefix + b"data: " + body + b"\n\n" + DONE_EVENT


class Wire:
    """OpenAI's API: SSE streams, ``{"error": {...}}`` bodies, ``usage`` objects."""

    # Whether a stream may begin (200, SSE comments) before the upstream's head arrives.
    commits = True

    def stream_usage(self, strip: bool) -> UsageCounter:
        return StreamUsage(strip=strip)

    def whole_tokens(self, raw: bytes) -> tuple[int | None, int | None]:
        """(prompt, completion) tokens a whole answer reports (None: not reported)."""
        return extract_tokens(raw[-TAIL_BYTES:])

    def estimate(self, raw: bytes) -> int:
        """The completion tokens of a whole answer that reports none."""
        return estimate_completion_tokens(raw)

    def error_body(self, status: int, message: str, code: str) -> bytes:
        return BrokerError(status, message, code).envelope()

    def stream_error(self, status: int, message: str, code: str, tail: bytes) -> bytes:
        """The end of a stream that failed after it began (``tail``: its last bytes)."""
        return sse_event(self.error_body(status, message, code), tail)

    def upstream_error(self, raw: bytes, status: int) -> bytes:
        """The upstream's error body as this API's clients read errors."""
        return json.dumps(normalize_error_body(raw, status)).encode()
