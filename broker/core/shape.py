"""A relayed route's shape: how the broker's own errors and the answer's usage look on it.

The route decides (``broker.core.route_shapes.shape_for``): OpenAI's shape by default,
Anthropic's for ``/v1/messages*`` (``broker.core.anthropic``). A shape says

- the body of an error the broker makes itself (before a status was sent),
- how a stream that already began ends on a failure (an in-band SSE event),
- how an upstream's error body is normalised,
- where a streamed or whole answer reports its token usage, and how to estimate it when
  it does not,
- the rate-limit headers its clients read.

``RouteShape`` itself is OpenAI's; another API subclasses it and overrides what differs.
No I/O: the response machine, the limit gate and the error boundary call it.
"""

from __future__ import annotations

import json
import re
from typing import Protocol

from broker.core.errors import BrokerError
from broker.core.limits import RateInfo
from broker.core.rate_headers import rate_headers
from broker.core.sse_usage import StreamUsage, estimate_completion_tokens
from shared.errors import normalize_error_body

__all__ = [
    "DONE_EVENT",
    "OPENAI",
    "TAIL_BYTES",
    "RouteShape",
    "UsageReader",
    "extract_tokens",
    "sse_prefix",
]

DONE_EVENT = b"data: [DONE]\n\n"


class UsageReader(Protocol):
    """Follows one streamed answer: the bytes to send on, and its token usage."""

    @property
    def exact(self) -> bool: ...
    @property
    def tokens_in(self) -> int | None: ...
    @property
    def tokens_out(self) -> int | None: ...
    @property
    def deltas(self) -> int: ...
    def feed(self, chunk: bytes) -> bytes: ...
    def finish(self) -> bytes: ...


def sse_prefix(tail: bytes) -> bytes:
    """A blank line when the stream stopped mid-event (``tail``: its last bytes sent)."""
    return b"" if not tail or tail.endswith(b"\n\n") else b"\n\n"


_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
TAIL_BYTES = 4096  # a whole OpenAI answer's usage is in its last bytes


def extract_tokens(tail: bytes) -> tuple[int | None, int | None]:
    """(prompt tokens, completion tokens) from the last usage object in ``tail``."""
    prompt = _PROMPT.findall(tail)
    completion = _COMPLETION.findall(tail)
    return (
        int(prompt[-1]) if prompt else None,
        int(completion[-1]) if completion else None,
    )


class RouteShape:
    """OpenAI's shape (the default): ``{"error": {...}}``, ``data: {...}`` + ``[DONE]``."""

    name = "openai"
    # Whether a stream may begin (200, SSE comments while waiting) before the upstream's head.
    commits = True

    def error_body(self, error: BrokerError, request_id: str | None = None) -> bytes:
        """The body of an error the broker answers with itself."""
        return error.envelope()

    def stream_error(self, error: BrokerError, tail: bytes) -> bytes:
        """What ends a stream that began, on a failure: an error event and ``[DONE]``."""
        return sse_prefix(tail) + b"data: " + error.envelope() + b"\n\n" + DONE_EVENT

    def upstream_error(self, raw: bytes, status: int) -> bytes:
        """An upstream's error body (any form) in this shape, its message kept."""
        return json.dumps(normalize_error_body(raw, status)).encode()

    def upstream_stream_error(self, raw: bytes, status: int) -> bytes:
        """An upstream's error after the broker committed to a stream: in-band."""
        return b"data: " + self.upstream_error(raw, status) + b"\n\n" + DONE_EVENT

    def stream_usage(self, strip: bool) -> UsageReader:
        return StreamUsage(strip=strip)

    def whole_usage(self, raw: bytes) -> tuple[int | None, int | None]:
        """(prompt, completion) tokens a whole answer reports; (None, None) if none."""
        return extract_tokens(raw[-TAIL_BYTES:])

    def estimate_completion(self, raw: bytes) -> int:
        return estimate_completion_tokens(raw)

    def rate_headers(self, info: RateInfo, now: float) -> dict[str, str]:
        """The rate-limit headers of a granted or refused request (``now``: wall clock)."""
        return rate_headers(info)


OPENAI = RouteShape()
