"""The API user's side of one relayed request, as a state machine with no I/O.

Feed it the request's events (the upstream head, body bytes, the end frame, or a failure
from the core) and the time; it returns what to send: ``Begin`` (status and headers),
``Body`` and ``Close``. ``next_deadline`` says when ``tick`` has something to do.

Streaming requests begin when the upstream head arrives, or commit to
``200 text/event-stream`` after ``commit_after`` and keep the stream alive with SSE comments.
Non-streaming requests are collected and answered whole, so a failure at any point still
gets a real status. A stream never just stops: an error after it began is one OpenAI-shaped
SSE ``error`` event followed by ``data: [DONE]``.

Token usage is settled here too (``Outcome``): exact from the upstream's ``usage``, else
estimated (``broker.core.sse_usage``), and ``partial`` when the answer did not complete.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from broker.core.errors import BrokerError, connector_failure
from broker.core.records import Failure, Pending
from broker.core.shape import DONE_EVENT as DONE_EVENT
from broker.core.shape import OPENAI, RouteShape
from shared.protocol import OVERHEAD_HEADER, REQUEST_ID_HEADER, ResponseEnd, ResponseHead

Event = bytes | ResponseHead | ResponseEnd | Failure

# The upstream's response headers an API user gets: what describes the body and its caching.
# Everything else stays in the broker: Set-Cookie (it would be set for the broker's origin,
# the portal's too), hop-by-hop and framing headers (the broker frames its own answer), and
# whatever names the upstream (Server, X-Powered-By, Via, its request IDs and timings).
# Rate-limit headers are the broker's own (--rpm-limit ...): the upstream's would describe
# the connector's key, shared by every user. Retry-After passes on an upstream error only.
# Lower-case name -> the name sent (the machine's own headers use these too, so they win).
PASSED_RESPONSE_HEADERS = {
    name.lower(): name
    for name in (
        "Content-Type",
        "Content-Language",
        "Cache-Control",
        "Expires",
        "Last-Modified",
        "ETag",
        "Vary",
    )
}
MAX_HEADER_VALUE = 1024
_HEADER_VALUE_OK = re.compile(r"[\x20-\x7e]*")  # printable ASCII: no CR, LF or NUL

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
WAITING_COMMENT = b": waiting for the model\n\n"
KEEPALIVE_COMMENT = b": keepalive\n\n"


@dataclass(frozen=True, slots=True)
class Begin:
    status: int
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Body:
    data: bytes
    upstream: bool = True  # False for what the broker adds (SSE comments and errors)


@dataclass(frozen=True, slots=True)
class Close:
    pass


Action = Begin | Body | Close
CLOSE = Close()


@dataclass
class Outcome:
    """What happened to one request: logged and recorded once at the end."""

    status: int = 0
    ttfb_ms: float | None = None
    bytes_out: int = 0
    error: str | None = None
    cancelled: bool = False
    overhead_ms: float | None = None
    # Final token counts (None: no answer to count). The limits settle reservations with them.
    tokens_in: int | None = None
    tokens_out: int | None = None
    estimated: bool = False  # counted by the broker: the upstream reported no usage
    partial: bool = False  # the answer did not complete: the counts are what was delivered


class Phase(Enum):
    WAITING = "waiting"  # nothing sent yet
    COMMITTED = "committed"  # 200 text/event-stream sent before the head: heartbeats
    STREAMING = "streaming"  # passing upstream bytes through
    COLLECTING = "collecting"  # a whole answer or an upstream error body
    DONE = "done"


def _value_ok(value: str) -> bool:
    return len(value) <= MAX_HEADER_VALUE and _HEADER_VALUE_OK.fullmatch(value) is not None


def pass_headers(head: ResponseHead) -> dict[str, str]:
    """The upstream's headers an API user may see (``PASSED_RESPONSE_HEADERS``)."""
    passed: dict[str, str] = {}
    for name, value in head.headers:
        sent = PASSED_RESPONSE_HEADERS.get(name.lower())
        if sent is not None and _value_ok(value):
            passed[sent] = value
    return passed


def upstream_retry_after(head: ResponseHead) -> str | None:
    """The upstream's Retry-After (on an error status) when it is a number of seconds."""
    for name, value in head.headers:
        if name.lower() == "retry-after" and value.isdigit() and len(value) <= 9:
            return value
    return None


class ResponseMachine:
    def __init__(
        self,
        *,
        pending: Pending,
        stream: bool,
        started: float,
        commit_after: float,
        heartbeat: float,
        strip_usage: bool = False,
        prompt_tokens: int | None = None,
        extra_headers: dict[str, str] | None = None,
        shape: RouteShape = OPENAI,
    ) -> None:
        """``strip_usage``: the broker added ``include_usage`` to the upstream request, so
        remove what that adds; ``prompt_tokens``: the estimate used when no usage comes;
        ``shape``: the route's (``broker.core.route_shapes``): its errors and its usage."""
        self.pending = pending  # read only: for the queue time in the overhead figure
        self.stream = stream
        self.prompt_tokens = prompt_tokens
        self.started = started
        self.commit_after = commit_after
        self.heartbeat = heartbeat
        self.phase = Phase.WAITING
        self.outcome = Outcome()
        self._head: ResponseHead | None = None
        self._collected: list[bytes] = []
        self.shape = shape
        self._usage = shape.stream_usage(strip_usage)
        self._tail = b""
        self._last_beat = started
        self._committed = False
        # Sent with every status this machine answers (the rate-limit headers).
        self._base = {REQUEST_ID_HEADER: pending.id, **(extra_headers or {})}

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    @property
    def begun(self) -> bool:
        """Whether a status has been sent (later errors go in-band, as SSE)."""
        return self._committed or self.phase is Phase.STREAMING

    # -- time -----------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        if self.phase is Phase.WAITING and self.stream and self.shape.commits:
            return self.started + self.commit_after
        if self._committed and self.phase in (Phase.COMMITTED, Phase.COLLECTING):
            return self._last_beat + self.heartbeat
        return None

    def tick(self, now: float) -> list[Action]:
        deadline = self.next_deadline()
        if deadline is None or now < deadline:
            return []
        self._last_beat = now
        if self.phase is Phase.WAITING:
            self.phase = Phase.COMMITTED
            self._committed = True
            headers = self._base_headers()
            headers.update(SSE_HEADERS)
            headers["Content-Type"] = "text/event-stream"
            return [Begin(200, headers), Body(WAITING_COMMENT, upstream=False)]
        return [Body(KEEPALIVE_COMMENT, upstream=False)]

    def abandon(self) -> None:
        """The API user went away."""
        if not self.done:
            self.outcome.cancelled = True
            self._settle_partial()
            self._end(499, "client_disconnected")

    # -- events ---------------------------------------------------------------------------

    def feed(self, events: Iterable[Event], now: float) -> list[Action]:
        out: list[Action] = []
        data: list[bytes] = []
        for event in events:
            if self.done:
                break
            if type(event) is bytes:
                data.append(event)
                continue
            if data:
                self._on_data(b"".join(data), now, out)
                data = []
            if isinstance(event, ResponseHead):
                self._on_head(event, now, out)
            elif isinstance(event, ResponseEnd):
                self._on_end(event, now, out)
            elif isinstance(event, Failure):
                self._fail(event.status, event.code, event.message, out)
        if data and not self.done:
            self._on_data(data[0] if len(data) == 1 else b"".join(data), now, out)
        return out

    def _on_head(self, head: ResponseHead, now: float, out: list[Action]) -> None:
        if self.phase not in (Phase.WAITING, Phase.COMMITTED):
            return  # a second head is ignored
        self._head = head
        self._overhead(now, head.upstream_ms)
        if head.status >= 400 or not self.stream:
            self.phase = Phase.COLLECTING
            return
        if self.phase is Phase.WAITING:
            headers = pass_headers(head)
            headers.update(self._base_headers())
            headers.update(SSE_HEADERS)
            headers[OVERHEAD_HEADER] = self._overhead_text()
            out.append(Begin(head.status, headers))
        self.phase = Phase.STREAMING

    def _on_data(self, chunk: bytes, now: float, out: list[Action]) -> None:
        if self.phase is Phase.STREAMING:
            data = self._usage.feed(chunk)
            if data:
                self._send(data, now, out)
        elif self.phase is Phase.COLLECTING:
            self._collected.append(chunk)
        # Bytes before a head break the protocol; the end frame will say what happened.

    def _on_end(self, end: ResponseEnd, now: float, out: list[Action]) -> None:
        head = self._head
        if head is None or not end.ok:
            if head is None and end.ok:
                self._fail(502, "bad_upload", "the connector ended without a response", out)
                return
            self._fail(*connector_failure(end.error_type, end.status), out)
            return
        if self.phase is Phase.STREAMING:
            rest = self._usage.finish()
            if rest:
                self._send(rest, now, out)
            self._settle_stream()
            out.append(CLOSE)
            self._end(200 if self._committed else head.status)
            return
        raw = b"".join(self._collected)
        if head.status >= 400:
            self._upstream_error(head, raw, out)
            return
        headers = pass_headers(head)
        headers.update(self._base_headers())
        self._overhead(now, end.upstream_ms or head.upstream_ms)
        headers[OVERHEAD_HEADER] = self._overhead_text()
        self._first_byte(now)
        self.outcome.bytes_out = len(raw)
        self._settle_whole(raw)
        out += [Begin(head.status, headers), Body(raw), CLOSE]
        self._end(head.status)

    def _upstream_error(self, head: ResponseHead, raw: bytes, out: list[Action]) -> None:
        if self._committed:
            event = self.shape.upstream_stream_error(raw, head.status)
            out += [Body(event, upstream=False), CLOSE]
        else:
            headers = self._base_headers()
            headers["Content-Type"] = "application/json"
            headers[OVERHEAD_HEADER] = self._overhead_text()
            retry_after = upstream_retry_after(head)
            if retry_after is not None:
                headers["Retry-After"] = retry_after
            envelope = self.shape.upstream_error(raw, head.status)
            out += [Begin(head.status, headers), Body(envelope, upstream=False), CLOSE]
        self._end(head.status, "upstream_status")

    def _fail(self, status: int, code: str, message: str, out: list[Action]) -> None:
        if self.phase is Phase.STREAMING:
            self._settle_partial()
        error = BrokerError(status, message, code)
        if self.begun:
            out += [Body(self.shape.stream_error(error, self._tail), upstream=False), CLOSE]
        else:
            headers = self._base_headers()
            headers["Content-Type"] = "application/json"
            if status == 503:
                headers["Retry-After"] = "1"
            body = self.shape.error_body(error, self.pending.id)
            out += [Begin(status, headers), Body(body, upstream=False), CLOSE]
        self._end(status, code)

    # -- usage ----------------------------------------------------------------------------

    def _send(self, data: bytes, now: float, out: list[Action]) -> None:
        self._tail = data[-2:]
        self._first_byte(now)
        self.outcome.bytes_out += len(data)
        out.append(Body(data))

    def _settle_stream(self) -> None:
        usage, outcome = self._usage, self.outcome
        if usage.exact:
            outcome.tokens_in, outcome.tokens_out = usage.tokens_in, usage.tokens_out
        else:
            # A prompt count the stream gave (Anthropic's message_start) beats the estimate.
            known = usage.tokens_in
            outcome.tokens_in = self.prompt_tokens if known is None else known
            outcome.tokens_out = usage.deltas
            outcome.estimated = True

    def _settle_whole(self, raw: bytes) -> None:
        outcome = self.outcome
        tokens_in, tokens_out = self.shape.whole_usage(raw)
        if tokens_in is None and tokens_out is None:
            outcome.tokens_in = self.prompt_tokens
            outcome.tokens_out = self.shape.estimate_completion(raw)
            outcome.estimated = True
        else:  # embeddings report prompt tokens only: nothing came out
            outcome.tokens_in, outcome.tokens_out = tokens_in, tokens_out or 0

    def _settle_partial(self) -> None:
        """The answer stops here: count what was delivered (nothing before the head)."""
        if self._head is None:
            self.outcome.partial = True
            return
        if self.phase is Phase.STREAMING:
            self._settle_stream()
        else:  # a whole answer is delivered all at once or not at all
            self.outcome.tokens_in, self.outcome.tokens_out = self.prompt_tokens, 0
            self.outcome.estimated = True
        self.outcome.partial = True

    # -- bookkeeping ----------------------------------------------------------------------

    def _end(self, status: int, error: str | None = None) -> None:
        self.phase = Phase.DONE
        self.outcome.status = status
        if error is not None:
            self.outcome.error = error

    def _base_headers(self) -> dict[str, str]:
        return dict(self._base)

    def _first_byte(self, now: float) -> None:
        if self.outcome.ttfb_ms is None:
            self.outcome.ttfb_ms = round((now - self.started) * 1000.0, 3)

    def _overhead(self, now: float, upstream_ms: float) -> None:
        """What the relay itself cost: time so far less the upstream's and the queue's."""
        pending = self.pending
        queued = max(0.0, pending.leased_at - pending.created) if pending.leased_at else 0.0
        elapsed = now - self.started
        overhead_ms = max(0.0, (elapsed - queued) * 1000.0 - upstream_ms)
        self.outcome.overhead_ms = round(overhead_ms, 3)

    def _overhead_text(self) -> str:
        return f"{self.outcome.overhead_ms or 0.0:.3f}"
