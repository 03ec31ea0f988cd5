"""Turn a request's channel events into the API user's response.

Streaming requests start answering when the upstream head arrives (or commit to
``200 text/event-stream`` after ``stream_commit_after`` and keep the stream alive with SSE
comments). Non-streaming requests are collected and answered whole, so a failure at any
point still gets a real status. A stream never just stops: an error after it began is one
OpenAI-shaped SSE ``error`` event followed by ``data: [DONE]``.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from quart import Response

from broker.channel import Event, Failure, ResponseChannel
from broker.dispatch import Pending
from broker.errors import error_response, type_for_status
from broker.hub import RelayHub
from broker.usage import TAIL_BYTES, extract_tokens
from shared.errors import error_body, normalize_error_body
from shared.logging import get_logger
from shared.protocol import OVERHEAD_HEADER, REQUEST_ID_HEADER, ResponseEnd, ResponseHead

log = get_logger("broker.responder")

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "content-encoding",
        "date",
        "server",
        "proxy-connection",
        "upgrade",
        "trailer",
        "te",
        "x-request-id",
    }
)
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE_EVENT = b"data: [DONE]\n\n"


@dataclass
class Outcome:
    """What happened to one request: logged once at the end."""

    status: int = 0
    ttfb_ms: float | None = None
    bytes_out: int = 0
    error: str | None = None
    cancelled: bool = False
    overhead_ms: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


def sse_error(status: int, message: str, code: str | None, tail: bytes) -> bytes:
    """An error event (after a blank line if the stream stopped mid-event) and [DONE]."""
    prefix = b"" if not tail or tail.endswith(b"\n\n") else b"\n\n"
    body = json.dumps(error_body(message, type_for_status(status), code=code)).encode()
    return prefix + b"data: " + body + b"\n\n" + DONE_EVENT


def _sse_error_from_upstream(status: int, raw: bytes, tail: bytes) -> bytes:
    prefix = b"" if not tail or tail.endswith(b"\n\n") else b"\n\n"
    body = json.dumps(normalize_error_body(raw, status)).encode()
    return prefix + b"data: " + body + b"\n\n" + DONE_EVENT


class Responder:
    def __init__(
        self,
        *,
        hub: RelayHub,
        pending: Pending,
        channel: ResponseChannel,
        stream: bool,
        commit_after: float,
        heartbeat: float,
        started: float,
        on_done: Callable[[Outcome], None],
    ) -> None:
        self.hub = hub
        self.pending = pending
        self.channel = channel
        self.stream = stream
        self.commit_after = commit_after
        self.heartbeat = heartbeat
        self.started = started
        self.on_done = on_done
        self.outcome = Outcome()
        self._finished = False

    @property
    def request_id(self) -> str:
        return self.pending.id

    # -- helpers --------------------------------------------------------------------------

    def _base_headers(self) -> dict[str, str]:
        return {REQUEST_ID_HEADER: self.request_id}

    def _overhead(self, upstream_ms: float) -> str:
        now = time.perf_counter()
        elapsed = (now - self.started) * 1000.0
        queue_ms = 0.0
        if self.pending.leased_at:
            queue_ms = max(0.0, (self.pending.leased_at - self.pending.created) * 1000.0)
        overhead = max(0.0, elapsed - upstream_ms - queue_ms)
        self.outcome.overhead_ms = round(overhead, 3)
        return f"{overhead:.3f}"

    def _finish(self, status: int, error: str | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        self.outcome.status = status
        if error is not None:
            self.outcome.error = error
        self.hub.finish(self.request_id)
        self.on_done(self.outcome)

    def abandon(self) -> None:
        """The API user went away before the response began."""
        if not self._finished:
            self.outcome.cancelled = True
            self.hub.cancel(self.request_id)
            self._finish(499, "client_disconnected")

    def _failure_response(self, failure: Failure) -> Response:
        headers = self._base_headers()
        if failure.status == 503:
            headers["Retry-After"] = "1"
        self._finish(failure.status, failure.code)
        return error_response(
            failure.status,
            failure.message,
            type_for_status(failure.status),
            code=failure.code,
            headers=headers,
        )

    def _end_error_response(self, end: ResponseEnd) -> Response:
        status = end.status or 502
        self._finish(status, end.error_type or "upstream_error")
        return error_response(
            status,
            end.error or "the upstream failed",
            type_for_status(status),
            code=end.error_type or "upstream_error",
            headers=self._base_headers(),
        )

    def _mark_first_byte(self) -> None:
        if self.outcome.ttfb_ms is None:
            self.outcome.ttfb_ms = round((time.perf_counter() - self.started) * 1000.0, 3)
            self.pending.user_saw_bytes = True

    # -- entry ----------------------------------------------------------------------------

    async def respond(self) -> Response:
        try:
            if self.stream:
                return await self._respond_stream()
            return await self._respond_whole()
        except BaseException:
            # Cancelled (the API user disconnected) or a bug: never leave work running.
            self.abandon()
            raise

    async def _collect_error(self, head: ResponseHead, events: list[Event]) -> Response:
        raw, end = await self._collect(events)
        headers = self._base_headers()
        headers[OVERHEAD_HEADER] = self._overhead(head.upstream_ms)
        for name, value in head.headers:
            if name.lower() == "retry-after":
                headers["Retry-After"] = value
        if isinstance(end, Failure):
            return self._failure_response(end)
        self._finish(head.status, "upstream_status")
        body = json.dumps(normalize_error_body(raw, head.status))
        response = Response(body, status=head.status, content_type="application/json")
        response.headers.update(headers)
        return response

    async def _collect(self, events: list[Event]) -> tuple[bytes, ResponseEnd | Failure]:
        parts: list[bytes] = []
        while True:
            for event in events:
                if isinstance(event, bytes):
                    parts.append(event)
                elif isinstance(event, ResponseEnd | Failure):
                    return b"".join(parts), event
            events = await self.channel.get()

    async def _respond_whole(self) -> Response:
        events = await self.channel.get()
        while True:
            for index, event in enumerate(events):
                if isinstance(event, Failure):
                    return self._failure_response(event)
                if isinstance(event, ResponseEnd):
                    return self._end_error_response(event)
                if isinstance(event, ResponseHead):
                    return await self._whole_after_head(event, events[index + 1 :])
            events = await self.channel.get()

    async def _whole_after_head(self, head: ResponseHead, rest: list[Event]) -> Response:
        if head.status >= 400:
            return await self._collect_error(head, rest)
        raw, end = await self._collect(rest)
        if isinstance(end, Failure):
            return self._failure_response(end)
        if not end.ok:
            return self._end_error_response(end)
        headers = _pass_headers(head)
        headers.update(self._base_headers())
        headers[OVERHEAD_HEADER] = self._overhead(end.upstream_ms or head.upstream_ms)
        self._mark_first_byte()
        self.outcome.bytes_out = len(raw)
        self.outcome.tokens_in, self.outcome.tokens_out = extract_tokens(raw[-TAIL_BYTES:])
        self._finish(head.status)
        response = Response(raw, status=head.status)
        response.headers.update(headers)
        return response

    async def _respond_stream(self) -> Response:
        commit_at = time.perf_counter() + self.commit_after
        events: list[Event] = []
        while True:
            remaining = commit_at - time.perf_counter()
            if remaining <= 0:
                return self._committed_response(events)
            events += await self.channel.get(timeout=remaining)
            for index, event in enumerate(events):
                if isinstance(event, Failure):
                    return self._failure_response(event)
                if isinstance(event, ResponseEnd):
                    return self._end_error_response(event)
                if isinstance(event, ResponseHead):
                    if event.status >= 400:
                        return await self._collect_error(event, events[index + 1 :])
                    headers = _pass_headers(event)
                    headers.update(self._base_headers())
                    headers.update(_SSE_HEADERS)
                    headers[OVERHEAD_HEADER] = self._overhead(event.upstream_ms)
                    response = Response(
                        self._stream_body(events[index + 1 :], event.status), status=event.status
                    )
                    response.headers.update(headers)
                    response.timeout = None
                    return response

    def _committed_response(self, events: list[Event]) -> Response:
        headers = self._base_headers()
        headers.update(_SSE_HEADERS)
        headers["Content-Type"] = "text/event-stream"
        response = Response(self._committed_body(events), status=200)
        response.headers.update(headers)
        response.timeout = None
        return response

    async def _committed_body(self, events: list[Event]) -> AsyncIterator[bytes]:
        """The stream was committed before the head: keep it alive, then relay or fail."""
        try:
            yield b": waiting for the model\n\n"
            while True:
                if not events:
                    events = await self.channel.get(timeout=self.heartbeat)
                    if not events:
                        yield b": keepalive\n\n"
                        continue
                for index, event in enumerate(events):
                    if isinstance(event, Failure):
                        self._finish(event.status, event.code)
                        yield sse_error(event.status, event.message, event.code, b"")
                        return
                    if isinstance(event, ResponseEnd):
                        status = event.status or 502
                        self._finish(status, event.error_type or "upstream_error")
                        yield sse_error(
                            status, event.error or "the upstream failed", event.error_type, b""
                        )
                        return
                    if isinstance(event, ResponseHead):
                        rest = events[index + 1 :]
                        if event.status >= 400:
                            raw, end = await self._collect(rest)
                            if isinstance(end, Failure):
                                self._finish(end.status, end.code)
                                yield sse_error(end.status, end.message, end.code, b"")
                            else:
                                self._finish(event.status, "upstream_status")
                                yield _sse_error_from_upstream(event.status, raw, b"")
                            return
                        self._overhead(event.upstream_ms)
                        async for chunk in self._stream_body(rest, 200):
                            yield chunk
                        return
                events = []
        finally:
            if not self._finished:
                self.abandon()

    async def _stream_body(self, events: list[Event], status: int) -> AsyncIterator[bytes]:
        tail = b""
        recent: deque[bytes] = deque(maxlen=16)  # the usage chunk comes last
        get = self.channel.get
        try:
            while True:
                pending_bytes: list[bytes] = []
                for event in events:
                    if type(event) is bytes:
                        pending_bytes.append(event)
                        continue
                    if pending_bytes:
                        chunk = b"".join(pending_bytes)
                        pending_bytes = []
                        tail = chunk[-2:]
                        recent.append(chunk)
                        self._mark_first_byte()
                        self.outcome.bytes_out += len(chunk)
                        yield chunk
                    if isinstance(event, ResponseEnd):
                        if event.ok:
                            last = b"".join(recent)[-TAIL_BYTES:]
                            self.outcome.tokens_in, self.outcome.tokens_out = extract_tokens(last)
                            self._finish(status)
                        else:
                            err_status = event.status or 502
                            self._finish(err_status, event.error_type or "upstream_error")
                            yield sse_error(
                                err_status,
                                event.error or "the upstream failed mid-stream",
                                event.error_type,
                                tail,
                            )
                        return
                    if isinstance(event, Failure):
                        self._finish(event.status, event.code)
                        yield sse_error(event.status, event.message, event.code, tail)
                        return
                if pending_bytes:
                    chunk = pending_bytes[0] if len(pending_bytes) == 1 else b"".join(pending_bytes)
                    tail = chunk[-2:]
                    recent.append(chunk)
                    self._mark_first_byte()
                    self.outcome.bytes_out += len(chunk)
                    yield chunk
                events = await get()
        finally:
            if not self._finished:
                self.abandon()


def _pass_headers(head: ResponseHead) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in head.headers:
        if name.lower() not in _HOP_BY_HOP:
            headers[name] = value
    return headers
