"""``POST /v1/*`` relayed by model to a connector, as plain ASGI.

Every relayed request and every chunk of its answer pass through here. Quart's request
context, routing and response wrapping cost about a tenth of the broker's CPU per request
on this path (py-spy, docs/performance.md), so it is served directly; Quart keeps the
model list, the pages and everything else. The response logic is the core's
``ResponseMachine``; this module only moves its actions onto ASGI messages and watches for
the API user hanging up.
"""

from __future__ import annotations

import asyncio
import time
from contextvars import ContextVar
from dataclasses import dataclass

import structlog

from broker.accounts.keys import INTERNAL_KEY_HASH, UserKey
from broker.api.aliasing import SERVED_MODEL_HEADER, Resolved, submit_alias
from broker.api.input import (
    CLIENT_REQUEST_ID_HEADER,
    ApiError,
    authenticate,
    authenticate_hash,
    authorize_model,
    client_label,
    new_request_id,
)
from broker.api.limit_gate import LimitGate, Reach, Ticket
from broker.asgi import Message, Receive, Scope, Send
from broker.broker_state import BrokerState
from broker.core import DispatchError, Pending, Seen, StateUnavailable
from broker.core.request_body import BodyRefused, JsonLimits, RequestBody, inspect
from broker.core.response import Action, Begin, Body, Close, Outcome, ResponseMachine
from broker.core.route_shapes import shape_for
from broker.core.sse_usage import USAGE_PATHS
from broker.errors import send_error
from broker.forwarded import client_address, parse_networks
from broker.metrics import UNKNOWN_MODEL_LABEL
from broker.state.relay import RelayState, ResponseSource
from broker.usage.ledger import UsageRecord
from shared.errors import quote
from shared.hoptrace import HopTrace
from shared.logging import get_logger
from shared.model_names import is_model_name, shown
from shared.paths import PathRefused, RouteTable, relayed_path
from shared.protocol import REQUEST_ID_HEADER, RequestItem

log = get_logger("broker.api.models")


# Client headers worth passing to the local LLM (never Authorization or x-api-key: the
# user's key stays here). Anthropic's version and beta headers select the API's behaviour.
_FORWARD_HEADERS = (
    b"accept",
    b"openai-beta",
    b"user-agent",
    b"anthropic-version",
    b"anthropic-beta",
)
# An oversized body is still read (and dropped) up to this much: answering before the
# client finished sending makes the server close a socket with unread data, which resets
# the connection and the client never sees the 413.
DRAIN_LIMIT = 64 * 1024 * 1024
# The client's own x-request-id (a label) of the request this task serves, for its record.
_CLIENT_LABEL: ContextVar[str | None] = ContextVar("client_request_id", default=None)
_CLIENT_LABEL_HEADER = CLIENT_REQUEST_ID_HEADER.encode()


@dataclass(slots=True)
class Progress:
    """How far a request got, for the settle of its limits."""

    pending: Pending | None = None
    outcome: Outcome | None = None

    @property
    def reach(self) -> Reach:
        if self.pending is None or self.pending.dispatches == 0:
            return Reach.NOWHERE
        return Reach.UPSTREAM if self.pending.head_seen else Reach.CONNECTOR


@dataclass(frozen=True, slots=True)
class UsageWatch:
    """What the response machine needs to count a request's tokens (docs/usage.md)."""

    strip: bool  # the broker added include_usage to the upstream request: remove its effect
    prompt_tokens: int  # the limits' prompt estimate, used when the upstream reports none


class ClientGone(Exception):
    """The API user hung up before the request body was complete: nothing to answer."""


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _request_path(scope: Scope) -> str:
    """The path as the client sent it (undecoded): what is checked is what is relayed."""
    raw = scope.get("raw_path")
    return raw.decode("latin-1") if isinstance(raw, bytes) else str(scope["path"])


def _encode(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


async def read_body(receive: Receive, declared: str | None, limit: int, rid: str) -> bytes:
    """The request body, refusing more than ``limit`` bytes without keeping them."""
    too_large = ApiError(
        413,
        f"request body exceeds {limit} bytes",
        "request_too_large",
        headers={REQUEST_ID_HEADER: rid},
    )
    if declared is not None and declared.isdigit() and int(declared) > DRAIN_LIMIT:
        raise too_large
    # One growing buffer rather than a list of chunks: a chunk is freed once copied, so
    # bodies read side by side leave no long-lived chunks interleaved in the heap.
    buffer = bytearray()
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone  # the client left while sending
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            buffer.clear()
            if size > DRAIN_LIMIT:
                raise too_large
        elif chunk:
            buffer += chunk
        if not message.get("more_body", False):
            break
    if size > limit:
        raise too_large
    return bytes(buffer)


class ApiRelay:
    """``POST /v1/*``. Another route family (Ollama's native API: ``broker/api/ollama.py``)
    subclasses it and overrides the hooks below the relay itself: ``route``, ``read`` and
    ``check_engine``. The shape of answers (errors, streams, usage) is the route's
    (``broker.core.route_shapes.shape_for``), whatever the family."""

    def __init__(self, state: BrokerState) -> None:
        self.state = state
        self.hub = state.relay
        self.trusted_proxies = parse_networks(state.settings.trusted_proxies)
        self.json_limits = JsonLimits(
            state.settings.max_json_depth, state.settings.max_json_elements
        )
        self.gate = LimitGate(
            state.limiter,
            state.settings.default_limits,
            state.settings.default_max_tokens,
            state.metrics,
        )
        self.routes = RouteTable.with_extra(state.settings.extra_api_routes)
        self.trace = state.trace

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = self.hub.clock()
        rid = new_request_id()  # the broker's key: never the client's x-request-id
        if self.trace is not None:
            self.trace.mark(rid, "api_in")
        label = client_label(_header(scope, b"x-request-id"))
        label_token = _CLIENT_LABEL.set(label)
        structlog.contextvars.bind_contextvars(request_id=rid)
        if label is not None:
            structlog.contextvars.bind_contextvars(client_request_id=label)
        began = False

        async def tracked(message: Message) -> None:
            nonlocal began
            began = True
            if label is not None and message["type"] == "http.response.start":
                echo = (_CLIENT_LABEL_HEADER, label.encode("latin-1"))
                message = {**message, "headers": [*message["headers"], echo]}
            await send(message)

        try:
            await self._relay(scope, receive, tracked, rid, started)
        except ClientGone:
            log.info("request_abandoned", stage="reading the body")
        except Exception as exc:
            # The one conversion: ApiError, a limiter's or the relay state's
            # StateUnavailable (503, Retry-After), anything else a fixed 500.
            if not isinstance(exc, ApiError):
                log.exception("api_unhandled_error", error_type=type(exc).__name__)
            if not began:  # mid-answer, the user sees the stream end early
                shape = shape_for(_request_path(scope))  # the route decides the error's shape
                await send_error(tracked, exc, {REQUEST_ID_HEADER: rid}, shape)
        finally:
            structlog.contextvars.unbind_contextvars("request_id", "client_request_id")
            _CLIENT_LABEL.reset(label_token)

    async def _relay(
        self, scope: Scope, receive: Receive, send: Send, rid: str, started: float
    ) -> None:
        state = self.state
        user = self._user(scope, rid)
        if self.hub.draining:
            raise ApiError(
                503,
                "The broker is shutting down; retry shortly.",
                "shutting_down",
                headers={REQUEST_ID_HEADER: rid, "Retry-After": "2"},
            )
        try:
            path = self.route(_request_path(scope))
        except PathRefused as exc:  # before the body is read and anything is queued
            raise ApiError(
                exc.status, exc.message, exc.code, headers={REQUEST_ID_HEADER: rid}
            ) from None
        limit = state.settings.max_request_body
        raw = await read_body(receive, _header(scope, b"content-length"), limit, rid)
        # Ask a streaming upstream for its usage chunk; the machine removes it again.
        asks = state.settings.ask_stream_usage and path in USAGE_PATHS
        try:
            request = self.read(raw, path, asks)
        except BodyRefused as exc:
            raise ApiError(
                400, exc.message, exc.code, param=exc.param, headers={REQUEST_ID_HEADER: rid}
            ) from None
        del raw  # the request holds its body once: request.raw
        item = self._item(scope, rid, path, request)
        if not is_model_name(request.model):
            # No connector may register such a name (shared/model_names.py): it cannot exist.
            # Recorded like any refusal (the ledger cuts the name), so probing shows in usage.
            self._refused(rid, user, item, 404, "model_not_found", started, known=False)
            raise ApiError(
                404,
                f"The model {shown(request.model)} does not exist",
                "model_not_found",
                type_="invalid_request_error",
                param="model",
                headers={REQUEST_ID_HEADER: rid},
            )
        await self.check_engine(rid, user, item, started)
        try:
            authorize_model(user, request.model, rid)
        except ApiError as exc:  # recorded; the metrics keep one label for all such names
            self._refused(rid, user, item, exc.status, exc.code, started, known=False)
            raise
        try:
            ticket = await self.gate.admit(user, request.ask, item.path, rid)
        except ApiError as exc:  # over a limit: 429, recorded like the relay's refusals
            try:
                live = item.model in state.aliases.aliases
                live = live or item.model in (await self.hub.view()).live_models
            except StateUnavailable:
                live = False
            self._refused(rid, user, item, exc.status, exc.code, started, known=live)
            raise
        progress = Progress()
        usage = UsageWatch(request.usage_added, request.ask.prompt)
        try:
            await self._dispatch(
                scope, receive, send, rid, started, user, item, ticket, progress, usage
            )
        finally:
            # Exactly once, however the request ended (refused, failed, cancelled).
            await self.gate.settle(ticket, progress.outcome, progress.reach)

    async def _dispatch(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        rid: str,
        started: float,
        user: UserKey,
        item: RequestItem,
        ticket: Ticket | None,
        progress: Progress,
        usage: UsageWatch,
    ) -> None:
        state = self.state
        limit_headers = ticket.headers if ticket is not None else {}
        alias = state.aliases.get(item.model)
        resolved: Resolved | None = None
        try:
            if alias is None:
                pending, channel = await self.hub.submit(item, user=user.id)
            else:
                limit = state.settings.max_request_body
                resolved = await submit_alias(self.hub, item, alias, user.id, limit)
                pending, channel = resolved.pending, resolved.channel
                limit_headers = {**limit_headers, SERVED_MODEL_HEADER: resolved.target.model}
        except DispatchError as exc:
            known = exc.status != 404 or alias is not None
            self._refused(rid, user, item, exc.status, exc.code, started, known)
            exc.headers.update(limit_headers)
            raise
        progress.pending = pending
        if self.trace is not None:
            self.trace.mark(rid, "submitted")
        client = scope.get("client")
        forwarded_for = _header(scope, b"x-forwarded-for")
        address = client_address(client[0] if client else None, forwarded_for, self.trusted_proxies)
        machine = ResponseMachine(
            pending=pending,
            stream=item.stream,
            started=started,
            commit_after=state.settings.stream_commit_after,
            heartbeat=state.settings.heartbeat,
            strip_usage=usage.strip,
            prompt_tokens=usage.prompt_tokens,
            extra_headers=limit_headers,
            shape=shape_for(item.path),
        )
        progress.outcome = machine.outcome
        responder = AsgiResponder(self.hub, pending, channel, machine, self.trace)
        try:
            await responder.run(receive, send)
        finally:
            self._done(rid, user, item, pending, machine.outcome, address, started, resolved)
            if self.trace is not None:
                self.trace.done(rid)

    def _user(self, scope: Scope, rid: str) -> UserKey:
        """The caller's key: the request's headers, or (the broker's own in-process requests
        only: the chat, docs/chat.md) the scope's extension naming the key by its hash."""
        keys = self.state.keys
        internal = (scope.get("extensions") or {}).get(INTERNAL_KEY_HASH)
        if isinstance(internal, str):
            return authenticate_hash(keys, internal, rid)
        authorization = _header(scope, b"authorization")
        return authenticate(keys, authorization, rid, _header(scope, b"x-api-key"))

    # -- what a route family changes -----------------------------------------------------

    def route(self, path: str) -> str:
        """The path relayed for ``path`` as sent, or PathRefused (before the body is read)."""
        return relayed_path(path, self.routes)

    def read(self, raw: bytes, path: str, ask_usage: bool) -> RequestBody:
        """The body checked once (shape, JSON, model), or BodyRefused."""
        return inspect(raw, self.json_limits, ask_usage)

    async def check_engine(
        self, rid: str, user: UserKey, item: RequestItem, started: float
    ) -> None:
        """Refuse (ApiError) a request no connector of the right engine could serve."""

    def _item(self, scope: Scope, rid: str, path: str, request: RequestBody) -> RequestItem:
        headers = {REQUEST_ID_HEADER: rid, "content-type": "application/json"}
        for key, value in scope["headers"]:
            if key in _FORWARD_HEADERS and value:
                headers[key.decode("latin-1")] = value.decode("latin-1")
        return RequestItem(
            request_id=rid,
            model=request.model,
            path=path,
            body=request.raw,
            headers=headers,
            stream=request.stream,
            timeout_s=self.state.settings.total_timeout,
        )

    # -- the record of each request -------------------------------------------------------

    def _refused(
        self,
        rid: str,
        user: UserKey,
        item: RequestItem,
        status: int,
        code: str,
        started: float,
        known: bool,
    ) -> None:
        """A request answered by the broker itself (unknown model, no connector, a limit)."""
        shown = quote(item.model) if known else UNKNOWN_MODEL_LABEL
        log.info("request_refused", model=quote(item.model), status=status, code=code)
        duration = self.hub.clock() - started
        # A client can name any model: unknown ones share one label, so /metrics stays small.
        self.state.metrics.request_done(shown, status, None, duration)
        self._usage(rid, user, item, status, duration, None, None)

    def _done(
        self,
        rid: str,
        user: UserKey,
        item: RequestItem,
        pending: Pending,
        outcome: Outcome,
        client: str | None,
        started: float,
        resolved: Resolved | None = None,
    ) -> None:
        duration = self.hub.clock() - started
        ttfb = outcome.ttfb_ms / 1000.0 if outcome.ttfb_ms is not None else None
        metrics = self.state.metrics
        # An alias's request counts under the model that served it, and under the alias.
        model = item.model if resolved is None else resolved.target.model
        metrics.request_done(model, outcome.status, ttfb, duration)
        metrics.usage_done(model, outcome.tokens_in, outcome.tokens_out, pending.queue_wait)
        if resolved is not None:
            metrics.alias_done(model, resolved.alias, outcome.status)
        served = resolved.target.model if resolved is not None else None
        self._usage(rid, user, item, outcome.status, duration, pending.connector, outcome, served)
        log.info(
            "request_done",
            request_id=rid,
            model=model,
            alias=resolved.alias if resolved is not None else None,
            user=user.id,
            client=client,
            connector=pending.connector,
            stream=item.stream,
            status=outcome.status,
            ttfb_ms=outcome.ttfb_ms,
            duration_ms=round(duration * 1000.0, 3),
            overhead_ms=outcome.overhead_ms,
            bytes_out=outcome.bytes_out,
            error=outcome.error,
            attempts=pending.dispatches,
            tokens_in=outcome.tokens_in,
            tokens_out=outcome.tokens_out,
            estimated=outcome.estimated,
            partial=outcome.partial,
        )

    def _usage(
        self,
        rid: str,
        user: UserKey,
        item: RequestItem,
        status: int,
        duration: float,
        connector: str | None,
        outcome: Outcome | None,
        served: str | None = None,
    ) -> None:
        """``served``: the real model that served an alias's request (``item.model`` names
        the alias then); None for a request that named a model, or an alias none served."""
        if self.state.usage is None:
            return
        named_alias = item.model in self.state.aliases.aliases
        self.state.usage.record(
            UsageRecord(
                ts=time.time(),
                request_id=rid,
                user_id=user.id,
                model=served or item.model,
                connector=connector,
                status=status,
                stream=item.stream,
                tokens_in=outcome.tokens_in if outcome else None,
                tokens_out=outcome.tokens_out if outcome else None,
                ttfb_ms=outcome.ttfb_ms if outcome else None,
                duration_ms=round(duration * 1000.0, 3),
                bytes_out=outcome.bytes_out if outcome else 0,
                key_name=user.name,
                estimated=outcome.estimated if outcome else False,
                partial=outcome.partial if outcome else False,
                client_request_id=_CLIENT_LABEL.get(),
                alias=item.model if named_alias or served is not None else None,
            )
        )


class AsgiResponder:
    """Moves a ResponseMachine's actions onto ASGI messages until it closes or the user leaves."""

    def __init__(
        self,
        hub: RelayState,
        pending: Pending,
        channel: ResponseSource,
        machine: ResponseMachine,
        trace: HopTrace | None = None,
    ) -> None:
        self.hub = hub
        self.pending = pending
        self.channel = channel
        self.machine = machine
        self.trace = trace

    async def run(self, receive: Receive, send: Send) -> None:
        # The body was read: the next message is http.disconnect, when the user hangs up.
        hangup: asyncio.Future[Message] = asyncio.ensure_future(receive())
        hangup.add_done_callback(lambda _: self.channel.interrupt())
        try:
            await self._pump(send, hangup)
        finally:
            if not hangup.done():
                hangup.cancel()
            if not self.machine.done:
                self.machine.abandon()
                await self.hub.cancel(self.pending.id)
            await self.hub.finish(self.pending.id)

    async def _pump(self, send: Send, hangup: asyncio.Future[Message]) -> None:
        machine = self.machine
        clock = self.hub.clock
        hub = self.hub
        pending = self.pending
        actions: list[Action] = []
        while True:
            if hangup.done():
                return
            if actions and type(actions[-1]) is Close and type(actions[0]) is Begin:
                await self._send_whole(send, actions)
                return
            for action in actions:
                if type(action) is Body:
                    if action.upstream:
                        hub.progress(pending, Seen.DELIVERED, clock(), len(action.data))
                        if self.trace is not None:
                            self.trace.mark(pending.id, "user_write")
                    await send(
                        {"type": "http.response.body", "body": action.data, "more_body": True}
                    )
                elif type(action) is Begin:
                    start = {"type": "http.response.start", "status": action.status}
                    await send(start | {"headers": _encode(action.headers)})
                elif type(action) is Close:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
            deadline = machine.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - clock())
            events = await self.channel.get(timeout)
            if self.trace is not None and events:
                self.trace.mark(pending.id, "user_took")
            now = clock()
            actions = machine.feed(events, now) if events else []
            if not machine.done:
                actions += machine.tick(now)

    async def _send_whole(self, send: Send, actions: list[Action]) -> None:
        """An answer known whole (non-streaming, or an error before any byte): one write."""
        begin = actions[0]
        assert isinstance(begin, Begin)
        body = b"".join(a.data for a in actions if isinstance(a, Body))
        if any(isinstance(a, Body) and a.upstream for a in actions):
            self.hub.progress(self.pending, Seen.DELIVERED, self.hub.clock(), len(body))
        headers = dict(begin.headers)
        headers["content-length"] = str(len(body))
        await send(
            {"type": "http.response.start", "status": begin.status, "headers": _encode(headers)}
        )
        if self.trace is not None:
            self.trace.mark(self.pending.id, "user_write")
        await send({"type": "http.response.body", "body": body, "more_body": False})
