"""Anthropic's Messages API shape: its error body, its stream's error event, its usage.

Followed from Anthropic's API reference ("Errors", "Streaming Messages", "Rate limits"),
recorded in docs/clients.md:

- an error is ``{"type": "error", "error": {"type": ..., "message": ...}, "request_id"}``;
  the type follows the status (400 invalid_request_error, 401 authentication_error, 403
  permission_error, 404 not_found_error, 413 request_too_large, 429 rate_limit_error, 500
  api_error, 503 and 529 overloaded_error; another 4xx invalid_request_error, another 5xx
  api_error). The broker keeps its own status codes (503, not 529, when no connector can
  take a request): the SDKs retry both alike.
- a stream that fails after it began ends with ``event: error`` carrying that body; there
  is no ``[DONE]`` in Anthropic's streams.
- usage: ``message_start`` carries ``message.usage.input_tokens`` (and the cache counts),
  ``message_delta`` the cumulative ``usage.output_tokens``; a whole answer has ``usage``.
  The input counted is ``input_tokens`` plus ``cache_creation_input_tokens`` and
  ``cache_read_input_tokens``: the whole prompt, as OpenAI's ``prompt_tokens`` counts it.
  A ``count_tokens`` answer (``{"input_tokens": n}``, no ``usage``) generated nothing and
  is counted as 0 in and 0 out, as Anthropic does not bill it either.
- the rate-limit headers are ``anthropic-ratelimit-*`` (``broker.core.rate_headers``).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from broker.core.errors import BrokerError
from broker.core.held import HeldBlocks
from broker.core.limits import RateInfo
from broker.core.rate_headers import anthropic_rate_headers
from broker.core.shape import RouteShape, UsageReader, sse_prefix
from shared.errors import normalize_error_body

__all__ = ["ANTHROPIC", "ERROR_TYPES", "AnthropicShape", "AnthropicUsage", "error_type"]

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
KNOWN_TYPES = frozenset(ERROR_TYPES.values()) | {"billing_error", "timeout_error"}
BYTES_PER_TOKEN = 4  # as broker.core.demand
MAX_EVENT = 1024 * 1024  # past this without a blank line the stream is not SSE: stop parsing

_USAGE = b'"usage"'
_DELTA = b'"content_block_delta"'
_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_INPUT_KEYS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    known = ERROR_TYPES.get(status)
    if known is not None:
        return known
    return "api_error" if status >= 500 else "invalid_request_error"


def envelope(type_: str, message: str, request_id: str | None = None) -> bytes:
    body: dict[str, Any] = {"type": "error", "error": {"type": type_, "message": message}}
    if request_id is not None:
        body["request_id"] = request_id
    return json.dumps(body).encode()


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def usage_counts(usage: object) -> tuple[int | None, int | None]:
    """(input incl. cache, output) of a ``usage`` object; None where it says nothing."""
    if not isinstance(usage, dict):
        return None, None
    inputs = [n for key in _INPUT_KEYS if (n := _count(usage.get(key))) is not None]
    return (sum(inputs) if inputs else None), _count(usage.get("output_tokens"))


def _data(event: bytes) -> object:
    """The parsed JSON of an SSE event's data lines, or None."""
    lines = [
        line[5:].removeprefix(b" ")
        for line in event.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        if line.startswith(b"data:")
    ]
    try:
        return json.loads(b"\n".join(lines)) if lines else None
    except ValueError:
        return None


def _split_point(data: bytes) -> int:
    """Where the last complete event of ``data`` ends (-1: none is complete)."""
    if b"\r" not in data:
        at = data.rfind(b"\n\n")
        return at + 2 if at >= 0 else -1
    ends = [match.end() for match in _BOUNDARY.finditer(data)]
    return ends[-1] if ends else -1


class AnthropicUsage:
    """Reads a Messages stream's usage; passes every byte on unchanged."""

    __slots__ = ("_events", "deltas", "tokens_in", "tokens_out")

    def __init__(self) -> None:
        self.tokens_in: int | None = None
        self.tokens_out: int | None = None
        self.deltas = 0  # content_block_delta events seen (the estimate's output count)
        self._events = HeldBlocks(_split_point, MAX_EVENT)

    @property
    def exact(self) -> bool:
        return self.tokens_out is not None

    def feed(self, chunk: bytes) -> bytes:
        if events := self._events.feed(chunk):
            self._block(events)
        return chunk

    def finish(self) -> bytes:
        if held := self._events.rest():
            self._block(held)
        return b""

    def _block(self, block: bytes) -> None:
        self.deltas += block.count(_DELTA)
        if _USAGE not in block:
            return
        for event in _BOUNDARY.split(block):
            if _USAGE in event:
                self._usage(_data(event))

    def _usage(self, doc: object) -> None:
        if not isinstance(doc, dict):
            return
        message = doc.get("message")
        started = isinstance(message, dict)  # message_start: its output count is a stub
        usage = message.get("usage") if isinstance(message, dict) else doc.get("usage")
        tokens_in, tokens_out = usage_counts(usage)
        if tokens_in is not None:
            self.tokens_in = tokens_in
        if tokens_out is not None and not started:
            self.tokens_out = tokens_out  # message_delta's is cumulative: the last one counts


def _text_bytes(content: object) -> int:
    size = 0
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        for key in ("text", "thinking"):
            value = block.get(key)
            if isinstance(value, str):
                size += len(value.encode("utf-8"))
        if block.get("type") == "tool_use":
            size += len(json.dumps(block.get("input"), ensure_ascii=False).encode("utf-8"))
    return size


def _parsed(raw: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


class AnthropicShape(RouteShape):
    name = "anthropic"

    def error_body(self, error: BrokerError, request_id: str | None = None) -> bytes:
        return envelope(error_type(error.status), error.message, request_id)

    def stream_error(self, error: BrokerError, tail: bytes) -> bytes:
        body = envelope(error_type(error.status), error.message)
        return sse_prefix(tail) + b"event: error\ndata: " + body + b"\n\n"

    def upstream_error(self, raw: bytes, status: int) -> bytes:
        # OpenAI-style, Anthropic-style or plain: the message is kept, the type checked.
        parsed = normalize_error_body(raw, status)["error"]
        given = parsed.get("type")
        type_ = given if given in KNOWN_TYPES else error_type(status)
        return envelope(type_, str(parsed.get("message")))

    def upstream_stream_error(self, raw: bytes, status: int) -> bytes:
        return b"event: error\ndata: " + self.upstream_error(raw, status) + b"\n\n"

    def stream_usage(self, strip: bool) -> UsageReader:
        return AnthropicUsage()

    def whole_usage(self, raw: bytes) -> tuple[int | None, int | None]:
        doc = _parsed(raw)
        if doc is None:
            return None, None
        if "usage" not in doc and _count(doc.get("input_tokens")) is not None:
            return 0, 0  # a count_tokens answer: nothing was generated
        return usage_counts(doc.get("usage"))

    def estimate_completion(self, raw: bytes) -> int:
        doc = _parsed(raw)
        size = _text_bytes(doc.get("content")) if doc is not None else 0
        return math.ceil(size / BYTES_PER_TOKEN)

    def rate_headers(self, info: RateInfo, now: float) -> dict[str, str]:
        return anthropic_rate_headers(info, now)


ANTHROPIC = AnthropicShape()
