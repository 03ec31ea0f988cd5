"""The relay protocol (``/relay/v1/*``) as one plain ASGI app.

One authorisation step for every route, one error type (``RelayError``; the core's
``UnknownSession`` and ``LeaseError`` are converted in the same place), and a catch-all
that logs the exception with the request ID and answers a JSON 500. Quart serves
everything else. Plain ASGI because every relayed request costs a poll answer and an
upload, and every chunk passes through an upload: Quart's request context, routing and
body handling cost a task hop and several hundred microseconds on each.
See docs/protocol.md for the exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog
from pydantic import BaseModel, ValidationError

from broker.accounts.keys import ConnectorIdentity, bearer
from broker.asgi import Receive, Scope, Send
from broker.broker_state import BrokerState
from broker.core import LeaseError, Registration, UnknownSession
from broker.core.aliases import session_routes
from broker.core.errors import BrokerError
from broker.errors import send_error
from broker.relay import enroll as enroll_relay
from broker.relay.claims import split_claims
from broker.relay.mux import MuxRegistry
from broker.relay.upload import FrameApplier, PartAssembler, UploadTooLarge
from broker.state.relay import Superseded
from shared.errors import FrameError
from shared.logging import get_logger
from shared.model_names import InvalidModelName
from shared.protocol import (
    PROTOCOL_REVISION,
    PROTOCOL_VERSION,
    RELAY_PREFIX,
    EnrollRequest,
    ModelsUpdate,
    ModelsUpdated,
    PollResponse,
    ProbeResult,
    RefusedModel,
    RegisterRequest,
    RegisterResponse,
    Replaced,
    RequestItem,
    UploadMode,
    UploadResult,
    WorkItem,
)

log = get_logger("broker.relay")


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
MAX_JSON = 1024 * 1024
FINISHED_REMEMBERED = 4096
POLL_MODES_REMEMBERED = 16384
# How long to wait for the rest of an upload body before answering anyway. Answering an
# HTTP/2 stream while its client still sends kills Hypercorn's whole connection (a
# KeyError on the closed stream: hypercorn issues #329/#365), and over HTTP/1.1 it costs
# the keep-alive connection.
DRAIN_AFTER_ANSWER = 5.0


M = TypeVar("M", bound=BaseModel)


# The relay routes' refusals: the broker's one error type (``broker.core.errors``).
RelayError = BrokerError


def _invalid(what: str, exc: ValidationError) -> RelayError:
    """A 400 naming each problem, without echoing the (possibly huge or hostile) input."""
    errors = exc.errors(include_input=False, include_url=False)
    for error in errors:
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidModelName):
            return RelayError(400, f"invalid {what}: {cause}", "invalid_model_name")
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5]
    )
    return RelayError(400, f"invalid {what}: {problems}"[:1000], "invalid_request")


def _too_many_models(count: int, limit: int) -> RelayError:
    return RelayError(
        400,
        f"{count} models in one session; the broker takes at most {limit} "
        "(its --max-models-per-session)",
        "too_many_models",
    )


@dataclass(slots=True)
class Call:
    """One relay request: what a route needs."""

    scope: Scope
    receive: Receive
    send: Send
    ident: ConnectorIdentity
    params: list[str]
    started: bool = False  # the response head went out

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, more: bool = False) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def respond(self, status: int, body: bytes) -> None:
        await self.start(status, [*_JSON, (b"content-length", str(len(body)).encode())])
        await self.body(body)

    async def read(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] != "http.request":
                raise RelayError(400, "the request ended early", "incomplete_body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RelayError(413, f"body exceeds {limit} bytes", "request_too_large")
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def model(self, cls: type[M]) -> M:
        try:
            return cls.model_validate_json(await self.read(MAX_JSON))
        except ValidationError as exc:
            raise _invalid(cls.__name__, exc) from None

    async def drain(self, timeout: float) -> None:
        """Read and drop what is left of the request body, for at most ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while True:
                    message = await self.receive()
                    if message["type"] != "http.request" or not message.get("more_body", False):
                        return


Route = Callable[[Call], Awaitable[None]]


class RelayApp:
    def __init__(self, state: BrokerState) -> None:
        self.state = state
        self.hub = state.relay
        self.assemblers: dict[str, PartAssembler] = {}
        # Recently completed parts uploads: a retried last part is a duplicate, not a 409.
        self.finished: OrderedDict[str, None] = OrderedDict()
        # The one route without a token (a connector asking to join): no authorisation.
        self._enroll: Route = self.enroll
        s = state.settings
        self.mux = MuxRegistry(self.hub, s.max_response_body, s.mux_buffer_limit, state.trace)
        self.trace = state.trace
        # (method, path pattern) -> route; "*" matches one path segment.
        self._routes: list[tuple[str, tuple[str, ...], Route]] = [
            ("POST", ("enroll",), self._enroll),
            ("POST", ("sessions",), self.register),
            ("DELETE", ("sessions", "*"), self.deregister),
            ("PUT", ("sessions", "*", "models"), self.update_models),
            ("POST", ("sessions", "*", "poll"), self.poll),
            ("POST", ("sessions", "*", "responses", "*"), self.upload_stream),
            ("POST", ("sessions", "*", "responses", "*", "parts", "*"), self.upload_part),
            ("POST", ("sessions", "*", "mux"), self.upload_mux),
            ("POST", ("probe",), self.probe_upload),
            ("GET", ("probe",), self.probe_download),
        ]

    # -- the one entry point --------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call = Call(scope, receive, send, _NOBODY, [])
        try:
            route, call.params = self._match(scope["method"], scope["path"])
            call.ident = _NOBODY if route is self._enroll else self._authorise(scope)
            await route(call)
        except BrokerError as exc:  # sessions, leases, enrollment, StateUnavailable: all here
            await self._error(call, exc)
        except Exception as exc:
            log.exception(
                "relay_unhandled_error",
                path=scope.get("path"),
                request_id=structlog.contextvars.get_contextvars().get("request_id"),
                error_type=type(exc).__name__,
            )
            await self._error(call, exc)  # a fixed 500
        finally:
            structlog.contextvars.unbind_contextvars("request_id")

    def _match(self, method: str, path: str) -> tuple[Route, list[str]]:
        parts = path[len(RELAY_PREFIX) :].strip("/").split("/")
        allowed: list[str] = []
        for route_method, pattern, route in self._routes:
            if len(pattern) != len(parts):
                continue
            if all(p == "*" or p == part for p, part in zip(pattern, parts, strict=True)):
                if route_method == method:
                    return route, [part for p, part in zip(pattern, parts, strict=True) if p == "*"]
                allowed.append(route_method)
        if allowed:
            raise RelayError(
                405,
                f"{method} is not allowed here (use {', '.join(allowed)})",
                "method_not_allowed",
            )
        raise RelayError(404, f"no relay route {path[:200]}", "unknown_url")

    def _authorise(self, scope: Scope) -> ConnectorIdentity:
        header = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None
        )
        token = bearer(header)
        ident = self.state.keys.connector(token) if token else None
        if ident is None:
            raise RelayError(
                401, "invalid connector token", "invalid_token", "authentication_error"
            )
        return ident

    @staticmethod
    async def _error(call: Call, exc: BaseException) -> None:
        if call.started:
            return  # mid-stream: the connector sees the answer end early
        with contextlib.suppress(Exception):  # the connector may be gone already
            await send_error(call.send, exc)

    # -- sessions -------------------------------------------------------------------------

    async def register(self, call: Call) -> None:
        req = await call.model(RegisterRequest)
        if req.protocol != PROTOCOL_VERSION:
            raise RelayError(
                400,
                f"protocol {req.protocol} is not supported (broker speaks {PROTOCOL_VERSION})",
                "protocol_mismatch",
            )
        ident = call.ident
        models, refused = self._claims(ident, req.models)
        mode = req.upload_mode
        if mode is not UploadMode.PARTS:
            # Connectors send stream or parts (and mux_upload: revision 2); anything else
            # is taken as stream.
            offered = self.state.settings.mux_upload
            wants = req.mux_upload or mode is UploadMode.MUX
            mode = UploadMode.MUX if wants and offered else UploadMode.STREAM
        name = ident.name or req.name
        registration = Registration(
            owner=ident.id,
            name=name,
            instance_id=req.instance_id,
            # Each model also pinned to this name: what an alias's pinned target routes to.
            models=frozenset(session_routes(models, name)),
            capacity=req.capacity,
            capacity_source=req.capacity_source,
            version=req.version,
            upload_mode=mode,
            upstream_api_key=ident.upstream_api_key,
            engine=req.engine,
        )
        session, replaced = await self.hub.register(registration)
        self.state.metrics.registrations.inc()
        log.info(
            "session_registered",
            session=session.id,
            connector=session.name,
            identity=ident.id,
            models=sorted(models),
            capacity=session.capacity,
            capacity_source=session.capacity_source,
            upload_mode=mode.value,
            version=req.version,
            engine=req.engine or None,
            replaced=replaced.value,
        )
        self._log_refused(session.id, ident, refused)
        if replaced is Replaced.LIVE:
            log.warning(
                "connector_name_clash",
                connector=session.name,
                identity=ident.id,
                hint="two live connector processes use one name with one token: "
                "give each its own --name",
            )
        s = self.state.settings
        reply = RegisterResponse(
            session_id=session.id,
            poll_wait_s=s.poll_wait,
            lease_s=s.lease,
            session_ttl_s=s.session_ttl,
            heartbeat_s=s.heartbeat,
            upload_mode=UploadMode.STREAM if mode is UploadMode.MUX else mode,
            max_part_bytes=s.max_part_bytes,
            replaced=replaced,
            revision=PROTOCOL_REVISION,
            mux_upload=mode is UploadMode.MUX,
            refused=refused,
        )
        await call.respond(200, reply.model_dump_json().encode())

    def _claims(
        self, ident: ConnectorIdentity, asked: list[str]
    ) -> tuple[list[str], list[RefusedModel]]:
        """The models a session of ``ident`` will serve, and those refused (with why)."""
        limit = self.state.settings.max_models_per_session
        if len(asked) > limit:
            raise _too_many_models(len(asked), limit)
        return split_claims(ident, asked)

    @staticmethod
    def _log_refused(
        session_id: str, ident: ConnectorIdentity, refused: list[RefusedModel]
    ) -> None:
        if refused:
            log.warning(
                "models_refused",
                session=session_id,
                identity=ident.id,
                models=[r.model for r in refused],
                hint="this token may serve only the models the operator allowed",
            )

    async def deregister(self, call: Call) -> None:
        await call.read(MAX_JSON)
        await self.hub.deregister(call.ident.id, call.params[0])
        await call.start(204, [])
        await call.body(b"")

    async def update_models(self, call: Call) -> None:
        update = await call.model(ModelsUpdate)
        session_id = call.params[0]
        models, refused = self._claims(call.ident, update.models)
        name = (await self.hub.session(call.ident.id, session_id)).name
        await self.hub.update_models(call.ident.id, session_id, session_routes(models, name))
        log.info("session_models", session=session_id, models=sorted(models))
        self._log_refused(session_id, call.ident, refused)
        reply = ModelsUpdated(models=models, refused=refused)
        await call.respond(200, reply.model_dump_json().encode())

    async def enroll(self, call: Call) -> None:
        """A connector without a token asks to join, and asks again for the verdict."""
        enroll_relay.check_enabled(self.state)
        req = await call.model(EnrollRequest)
        status, body = await enroll_relay.answer(self.state, req, call.scope)
        await call.respond(status, body)

    # -- polls ----------------------------------------------------------------------------

    async def poll(self, call: Call) -> None:
        session_id = call.params[0]
        await self.hub.session(call.ident.id, session_id)  # 404 before reading anything
        await call.read(64 * 1024)
        streamed = b"stream=1" in call.scope.get("query_string", b"")
        self._note_poll_mode(session_id, streamed)
        if streamed:
            await self._poll_stream(call, session_id)
            return
        # The next message is http.disconnect: it tells us the connector hung up.
        hangup: asyncio.Future[object] = asyncio.ensure_future(call.receive())
        try:
            items = await self.hub.poll(
                call.ident.id, session_id, self.state.settings.poll_wait, abort=hangup
            )
        except Superseded:
            items = []
        finally:
            if not hangup.done():
                hangup.cancel()
        if self.trace is not None:
            self._traced(items)
        await call.respond(200, PollResponse(items=items).model_dump_json().encode())

    def _traced(self, items: list[WorkItem]) -> None:
        assert self.trace is not None
        for item in items:
            if isinstance(item, RequestItem):
                self.trace.mark(item.request_id, "poll_written")

    def _note_poll_mode(self, session_id: str, streamed: bool) -> None:
        modes = self.state.poll_modes
        modes[session_id] = "stream" if streamed else "classic"
        # Bounded without asking the relay state: the oldest entries are of ended sessions
        # (a live session's poll re-inserts it... at its old place, hence the margin).
        while len(modes) > POLL_MODES_REMEMBERED:
            del modes[next(iter(modes))]

    async def _poll_stream(self, call: Call, session_id: str) -> None:
        """Fast path (docs/protocol.md): one poll answer carries work items as they come.

        Each batch is one line of JSON; the answer ends after the hold. The connector uses
        this only when its probe showed the path delivers responses incrementally.
        """
        hub = self.hub
        hangup: asyncio.Future[object] = asyncio.ensure_future(call.receive())
        deadline = hub.clock() + self.state.settings.poll_wait
        try:
            while not hangup.done():
                remaining = deadline - hub.clock()
                if remaining <= 0:
                    break
                try:
                    items = await hub.poll(call.ident.id, session_id, remaining, abort=hangup)
                except (Superseded, UnknownSession):
                    if not call.started:
                        raise
                    break
                if not call.started:
                    await call.start(200, _NDJSON)
                if items:
                    line = PollResponse(items=items).model_dump_json().encode() + b"\n"
                    if self.trace is not None:
                        self._traced(items)
                    await call.body(line, more=True)
                elif hub.draining:
                    break
        except Superseded:
            pass
        finally:
            if not hangup.done():
                hangup.cancel()
        if not call.started:
            await call.start(200, _NDJSON)
        with contextlib.suppress(Exception):
            await call.body(b"")

    # -- uploads --------------------------------------------------------------------------

    async def _applier(self, session_id: str, request_id: str) -> FrameApplier:
        pending, channel = await self.hub.ack(session_id, request_id)
        limit = self.state.settings.max_response_body
        return FrameApplier(self.hub, self.hub.clock, pending, channel, limit)

    async def upload_stream(self, call: Call) -> None:
        session_id, request_id = call.params
        await self.hub.session(call.ident.id, session_id)
        applier = await self._applier(session_id, request_id)
        structlog.contextvars.bind_contextvars(request_id=request_id)
        status, body = 200, _OK
        ended = False  # the connector finished sending its body
        try:
            while True:
                message = await call.receive()
                if message["type"] != "http.request":
                    ended = True
                    break  # the connector disconnected
                applier.feed(message.get("body", b""))
                await applier.flush()
                ended = not message.get("more_body", False)
                if applier.done or applier.cancelled or ended:
                    break
            if not ended:
                await call.drain(DRAIN_AFTER_ANSWER)
            if applier.cancelled and not applier.done:
                body = _CANCELLED
        except (FrameError, UploadTooLarge) as exc:
            log.warning("upload_rejected", error=str(exc))
            await applier.abort(502, "bad_upload", f"the connector sent a bad response: {exc}")
            status, body = 400, RelayError(400, str(exc), "bad_upload").envelope()
        finally:
            if not applier.done and not applier.cancelled:
                await applier.abort(502, "connector_lost", "the connector's upload ended early")
            await self.hub.finish(request_id)
        with contextlib.suppress(Exception):  # the connector may be gone already
            await call.respond(status, body)

    async def upload_mux(self, call: Call) -> None:
        """The multiplexed upload (``broker.relay.mux``): every response of the session, tagged.

        Read continuously and never paced by an API client: each request's buffering is
        bounded by the lane itself. Answered when the connector ends the body.
        """
        session_id = call.params[0]
        session = await self.hub.session(call.ident.id, session_id)
        if session.upload_mode is not UploadMode.MUX:
            raise RelayError(
                409, "this session was not granted the multiplexed upload", "mux_not_granted"
            )
        lane = self.mux.lane(session_id)
        hub = self.hub
        log.info("mux_upload_opened", session=session_id)
        status, body = 200, _OK
        ended = False
        try:
            while True:
                message = await call.receive()
                if message["type"] != "http.request":
                    ended = True
                    break  # the connection dropped: a cut, unless CLOSE came first
                await lane.feed(message.get("body", b""))
                ended = not message.get("more_body", False)
                if lane.closed or ended:
                    break
                if not hub.session_alive(session_id):
                    raise UnknownSession(session_id)  # its requests were failed with it
            if not ended:
                await call.drain(DRAIN_AFTER_ANSWER)
        except FrameError as exc:
            log.warning("mux_upload_rejected", session=session_id, error=str(exc))
            status, body = 400, RelayError(400, str(exc), "bad_upload").envelope()
        finally:
            await lane.end(clean=lane.closed)
            log.info("mux_upload_closed", session=session_id, clean=lane.closed)
        with contextlib.suppress(Exception):  # the connector may be gone already
            await call.respond(status, body)

    async def upload_part(self, call: Call) -> None:
        session_id, request_id, seq_text = call.params
        if not seq_text.isdigit():
            raise RelayError(404, "a part number is a non-negative integer", "unknown_url")
        seq = int(seq_text)
        await self.hub.session(call.ident.id, session_id)
        structlog.contextvars.bind_contextvars(request_id=request_id)
        assembler = self.assemblers.get(request_id)
        if assembler is None and request_id in self.finished:
            await call.read(MAX_PART)
            await call.respond(200, _DUPLICATE)
            return
        if assembler is None:
            applier = await self._applier(session_id, request_id)
            limit = self.state.settings.parts_buffer_limit
            assembler = PartAssembler(applier, max_bytes=limit)
            self.assemblers[request_id] = assembler
            self._prune()
        elif assembler.applier.pending.session_id != session_id:
            raise LeaseError()
        data = await call.read(MAX_PART)
        applier = assembler.applier
        try:
            fresh = await assembler.add(seq, data)
        except (FrameError, UploadTooLarge) as exc:
            await applier.abort(502, "bad_upload", f"the connector sent a bad response: {exc}")
            await self._forget(request_id)
            raise RelayError(400, str(exc), "bad_upload") from None
        if applier.done or applier.cancelled:
            await self._forget(request_id)
            if applier.cancelled and not applier.done:
                await call.respond(200, _CANCELLED)
                return
        await call.respond(200, _OK if fresh else _DUPLICATE)

    async def _forget(self, request_id: str) -> None:
        self.assemblers.pop(request_id, None)
        await self.hub.finish(request_id)
        self.finished[request_id] = None
        while len(self.finished) > FINISHED_REMEMBERED:
            self.finished.popitem(last=False)

    def _prune(self) -> None:
        """Drop assemblers of requests that ended elsewhere (session died, timed out)."""
        if len(self.assemblers) % 64:
            return
        ended = self.hub.is_cancelled
        for rid in [r for r in self.assemblers if ended(r)]:
            del self.assemblers[rid]

    # -- probes ---------------------------------------------------------------------------

    async def probe_upload(self, call: Call) -> None:
        """Measures whether a chunked body sent with gaps arrives incrementally."""
        arrivals: list[float] = []
        size = 0
        while True:
            message = await call.receive()
            if message["type"] != "http.request":
                raise RelayError(400, "the probe ended early", "incomplete_body")
            chunk = message.get("body", b"")
            if chunk:
                arrivals.append(time.perf_counter())
                size += len(chunk)
                if size > MAX_JSON:
                    raise RelayError(413, "probe body too large", "too_large")
            if not message.get("more_body", False):
                break
        spread = (arrivals[-1] - arrivals[0]) * 1000.0 if arrivals else 0.0
        # The connector sends its pieces ~300 ms apart: a buffering proxy delivers them at once.
        result = ProbeResult(incremental=spread >= 100.0, chunks=len(arrivals), spread_ms=spread)
        await call.respond(200, result.model_dump_json().encode())

    async def probe_download(self, call: Call) -> None:
        """Streams three pieces ~300 ms apart: does the path deliver a response as it comes?"""
        await call.start(
            200,
            [
                (b"content-type", b"application/octet-stream"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
            ],
        )
        for i in range(3):
            if i:
                await asyncio.sleep(0.3)
            await call.body(b"probe" * 20 + b"\n", more=True)
        await call.body(b"")


_NOBODY = ConnectorIdentity(id="", name=None, upstream_api_key=None)


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj).encode()
