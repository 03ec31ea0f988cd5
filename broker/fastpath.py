"""The relay's hot calls as plain ASGI, in front of the Quart app.

Every relayed request costs the broker a poll answer and an upload; every relayed chunk
passes through the upload. Quart's request context, routing and body buffering add a task
hop and several hundred microseconds to each of those, so the poll and the two upload
routes are served here directly; everything else (registration, models, probe, the
OpenAI API) goes on to Quart. Same URLs, same answers as docs/protocol.md describes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import structlog

from broker.channel import ResponseChannel
from broker.dispatch import LeaseError, Pending, UnknownSession
from broker.hub import Superseded
from broker.keys import ConnectorIdentity, bearer
from broker.state import BrokerState
from broker.upload import FrameApplier, PartAssembler, UploadTooLarge
from shared.errors import FrameError, error_body
from shared.logging import get_logger
from shared.protocol import RELAY_PREFIX, PollResponse, UploadResult

log = get_logger("broker.fastpath")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]

_SESSIONS = RELAY_PREFIX + "/sessions/"
_JSON = [(b"content-type", b"application/json")]
_NDJSON = [
    (b"content-type", b"application/x-ndjson"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_OK = UploadResult(status="ok").model_dump_json().encode()
_CANCELLED = UploadResult(status="cancelled").model_dump_json().encode()
_DUPLICATE = UploadResult(status="duplicate").model_dump_json().encode()
MAX_PART = 16 * 1024 * 1024


class HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.body = _dumps(error_body(message, type_, code=code))


def _dumps(obj: object) -> bytes:
    return json.dumps(obj).encode()


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*_JSON, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


# How long to wait for the rest of an upload body before answering anyway. Answering an
# HTTP/2 stream while its client still sends kills Hypercorn's whole connection (a
# KeyError on the closed stream: hypercorn issues #329/#365), and over HTTP/1.1 it costs
# the keep-alive connection.
DRAIN_AFTER_ANSWER = 5.0


async def _drain_body(receive: Receive, timeout: float) -> None:
    """Read and drop what is left of a request body, for at most ``timeout`` seconds."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return


class RelayFastPath:
    def __init__(self, app: ASGIApp, state: BrokerState) -> None:
        self.app = app
        self.state = state
        self.assemblers: dict[str, PartAssembler] = {}
        # Recently completed parts uploads: a retried last part is a duplicate, not a 409.
        self.finished: OrderedDict[str, None] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            if path.startswith(_SESSIONS):
                parts = path[len(_SESSIONS) :].split("/")
                route = self._route(parts)
                if route is not None:
                    try:
                        await route(scope, receive, send, parts)
                    except HTTPError as exc:
                        await _respond(send, exc.status, exc.body)
                    return
        await self.app(scope, receive, send)

    def _route(
        self, parts: list[str]
    ) -> Callable[[Scope, Receive, Send, list[str]], Awaitable[None]] | None:
        n = len(parts)
        if n == 2 and parts[1] == "poll":
            return self._poll
        if n == 3 and parts[1] == "responses":
            return self._upload_stream
        if n == 5 and parts[1] == "responses" and parts[3] == "parts" and parts[4].isdigit():
            return self._upload_part
        return None

    # -- helpers --------------------------------------------------------------------------

    def _identify(self, scope: Scope, session_id: str) -> ConnectorIdentity:
        header = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None
        )
        token = bearer(header)
        ident = self.state.keys.connector(token) if token else None
        if ident is None:
            raise HTTPError(401, "invalid connector token", "invalid_token", "authentication_error")
        session = self.state.hub.dispatcher.sessions.get(session_id)
        if session is None or session.owner != ident.id:
            raise HTTPError(404, "unknown session: register again", "session_unknown")
        return ident

    def _lease(self, session_id: str, request_id: str) -> Pending:
        try:
            return self.state.hub.ack(session_id, request_id)
        except UnknownSession:
            raise HTTPError(404, "unknown session: register again", "session_unknown") from None
        except LeaseError:
            raise HTTPError(
                409,
                "this request is not leased to the session (it expired or was cancelled)",
                "lease_lost",
            ) from None

    def _applier(self, pending: Pending) -> FrameApplier:
        channel = pending.sink
        assert isinstance(channel, ResponseChannel)
        return FrameApplier(self.state.hub, pending, channel, self.state.settings.max_response_body)

    @staticmethod
    async def _read_all(receive: Receive, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise HTTPError(400, "the request ended early", "incomplete_body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, "body too large", "request_too_large")
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    # -- routes ---------------------------------------------------------------------------

    async def _poll(self, scope: Scope, receive: Receive, send: Send, parts: list[str]) -> None:
        session_id = parts[0]
        self._identify(scope, session_id)
        await self._read_all(receive, 64 * 1024)
        if b"stream=1" in scope.get("query_string", b""):
            await self._poll_stream(session_id, receive, send)
            return
        # The next message is http.disconnect: it tells us the connector hung up.
        hangup: asyncio.Future[object] = asyncio.ensure_future(receive())
        try:
            items = await self.state.hub.poll(
                session_id, self.state.settings.poll_wait, abort=hangup
            )
        except Superseded:
            items = []
        except UnknownSession:
            raise HTTPError(404, "unknown session: register again", "session_unknown") from None
        finally:
            if not hangup.done():
                hangup.cancel()
        await _respond(send, 200, PollResponse(items=items).model_dump_json().encode())

    async def _poll_stream(self, session_id: str, receive: Receive, send: Send) -> None:
        """Fast path (DESIGN.md 2.9): one poll answer carries work items as they come.

        Each batch is one line of JSON; the answer ends after the hold. The connector uses
        this only when its probe showed the path delivers responses incrementally.
        """
        hub = self.state.hub
        hangup: asyncio.Future[object] = asyncio.ensure_future(receive())
        deadline = hub.clock() + self.state.settings.poll_wait
        started = False
        try:
            while not hangup.done():
                remaining = deadline - hub.clock()
                if remaining <= 0:
                    break
                try:
                    items = await hub.poll(session_id, remaining, abort=hangup)
                except Superseded:
                    break
                except UnknownSession:
                    if not started:
                        raise HTTPError(
                            404, "unknown session: register again", "session_unknown"
                        ) from None
                    break
                if not started:
                    await send({"type": "http.response.start", "status": 200, "headers": _NDJSON})
                    started = True
                if items:
                    line = PollResponse(items=items).model_dump_json().encode() + b"\n"
                    await send({"type": "http.response.body", "body": line, "more_body": True})
                elif hub.dispatcher.draining:
                    break
        finally:
            if not hangup.done():
                hangup.cancel()
        if not started:
            await send({"type": "http.response.start", "status": 200, "headers": _NDJSON})
        with contextlib.suppress(Exception):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _upload_stream(
        self, scope: Scope, receive: Receive, send: Send, parts: list[str]
    ) -> None:
        session_id, request_id = parts[0], parts[2]
        self._identify(scope, session_id)
        pending = self._lease(session_id, request_id)
        applier = self._applier(pending)
        structlog.contextvars.bind_contextvars(request_id=request_id)
        status, body = 200, _OK
        ended = False  # the connector finished sending its body
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    ended = True
                    break  # the connector disconnected
                applier.feed(message.get("body", b""))
                ended = not message.get("more_body", False)
                if applier.done or applier.cancelled or ended:
                    break
            if not ended:
                await _drain_body(receive, DRAIN_AFTER_ANSWER)
            if applier.cancelled and not applier.done:
                body = _CANCELLED
        except (FrameError, UploadTooLarge) as exc:
            log.warning("upload_rejected", error=str(exc))
            applier.abort(502, "bad_upload", f"the connector sent a bad response: {exc}")
            status, body = 400, _dumps(error_body(str(exc), code="bad_upload"))
        finally:
            if not applier.done and not applier.cancelled:
                applier.abort(502, "connector_lost", "the connector's upload ended early")
            self.state.hub.finish(request_id)
            structlog.contextvars.unbind_contextvars("request_id")
        with contextlib.suppress(Exception):  # the connector may be gone already
            await _respond(send, status, body)

    async def _upload_part(
        self, scope: Scope, receive: Receive, send: Send, parts: list[str]
    ) -> None:
        session_id, request_id, seq = parts[0], parts[2], int(parts[4])
        self._identify(scope, session_id)
        assembler = self.assemblers.get(request_id)
        if assembler is None and request_id in self.finished:
            await self._read_all(receive, MAX_PART)
            await _respond(send, 200, _DUPLICATE)
            return
        if assembler is None:
            pending = self._lease(session_id, request_id)
            assembler = PartAssembler(self._applier(pending))
            self.assemblers[request_id] = assembler
            self._prune()
        elif assembler.applier.pending.session_id != session_id:
            raise HTTPError(409, "this request is leased elsewhere", "lease_lost")
        data = await self._read_all(receive, MAX_PART)
        applier = assembler.applier
        try:
            fresh = assembler.add(seq, data)
        except (FrameError, UploadTooLarge) as exc:
            applier.abort(502, "bad_upload", f"the connector sent a bad response: {exc}")
            self._forget(request_id)
            raise HTTPError(400, str(exc), "bad_upload") from None
        if applier.done or applier.cancelled:
            self._forget(request_id)
            if applier.cancelled and not applier.done:
                await _respond(send, 200, _CANCELLED)
                return
        await _respond(send, 200, _OK if fresh else _DUPLICATE)

    def _forget(self, request_id: str) -> None:
        self.assemblers.pop(request_id, None)
        self.state.hub.finish(request_id)
        self.finished[request_id] = None
        while len(self.finished) > 4096:
            self.finished.popitem(last=False)

    def _prune(self) -> None:
        """Drop assemblers of requests that ended elsewhere (session died, timed out)."""
        if len(self.assemblers) % 64:
            return
        requests = self.state.hub.dispatcher.requests
        for rid in [r for r in self.assemblers if r not in requests]:
            del self.assemblers[rid]
