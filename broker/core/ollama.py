"""Ollama's native API shape (``/api/*``): its error body, its stream's end, its usage.

Followed from Ollama's ``docs/api.md`` and the ``ollama`` client (docs/clients.md):

- an error is ``{"error": "text"}``, as the body of an answer the broker makes and as one
  more line when a stream fails after it began (how Ollama itself ends a failed stream,
  and what the ``ollama`` client raises ``ResponseError`` for);
- streams are NDJSON (``broker.core.ndjson_usage`` reads their usage); an NDJSON stream
  has no comments, so nothing is sent before the upstream's head (``commits``);
- rate-limit headers are OpenAI's ``x-ratelimit-*`` (Ollama has none of its own).
"""

from __future__ import annotations

import json
import math

from broker.core.demand import BYTES_PER_TOKEN
from broker.core.errors import BrokerError
from broker.core.ndjson_usage import NdjsonUsage, ndjson_counts
from broker.core.shape import TAIL_BYTES, RouteShape, UsageReader
from shared.errors import normalize_error_body

__all__ = ["OLLAMA", "OllamaShape", "ollama_error"]


def ollama_error(message: str) -> bytes:
    """Ollama's error body."""
    return json.dumps({"error": message}).encode()


def _text_bytes(doc: object) -> int:
    if not isinstance(doc, dict):
        return 0
    message = doc.get("message")
    content = message.get("content") if isinstance(message, dict) else doc.get("response")
    return len(content.encode("utf-8")) if isinstance(content, str) else 0


def _line(body: bytes, tail: bytes) -> bytes:
    """``body`` as one NDJSON line, after a newline if the stream stopped mid-line."""
    prefix = b"" if not tail or tail.endswith(b"\n") else b"\n"
    return prefix + body + b"\n"


class OllamaShape(RouteShape):
    """Ollama's native API: NDJSON streams, ``{"error": "..."}``, ``eval_count``."""

    name = "ollama"
    commits = False

    def error_body(self, error: BrokerError, request_id: str | None = None) -> bytes:
        return ollama_error(error.message)

    def stream_error(self, error: BrokerError, tail: bytes) -> bytes:
        return _line(ollama_error(error.message), tail)

    def upstream_error(self, raw: bytes, status: int) -> bytes:
        return ollama_error(str(normalize_error_body(raw, status)["error"]["message"]))

    def upstream_stream_error(self, raw: bytes, status: int) -> bytes:
        return _line(self.upstream_error(raw, status), b"")

    def stream_usage(self, strip: bool) -> UsageReader:
        return NdjsonUsage()

    def whole_usage(self, raw: bytes) -> tuple[int | None, int | None]:
        return ndjson_counts(raw[-TAIL_BYTES:])

    def estimate_completion(self, raw: bytes) -> int:
        try:
            doc = json.loads(raw)
        except ValueError:
            return 0
        return math.ceil(_text_bytes(doc) / BYTES_PER_TOKEN)


OLLAMA = OllamaShape()
