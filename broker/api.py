"""The OpenAI-compatible API: ``/v1/*`` relayed by model to a connector."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import structlog
from quart import Blueprint, Response, request

from broker.core import DispatchError
from broker.core.response import Outcome, ResponseMachine
from broker.errors import error_response
from broker.forwarded import client_address, parse_networks
from broker.keys import UserKey, bearer
from broker.responder import Responder
from broker.state import BrokerState
from broker.usage import UsageRecord
from shared.errors import quote
from shared.logging import get_logger
from shared.protocol import REQUEST_ID_HEADER, RequestItem

log = get_logger("broker.api")

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Client headers worth passing to the local LLM (never Authorization: the user's key stays here).
_FORWARD_HEADERS = ("accept", "openai-beta", "user-agent")


class BodyError(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def new_request_id() -> str:
    # A UUID: llama-cpp-python's server refuses any other x-request-id with a 400.
    return str(uuid.uuid4())


def request_id_for(header: str | None) -> str:
    if header and _REQUEST_ID_OK.match(header):
        return header
    return new_request_id()


UNKNOWN_MODEL_LABEL = "(unknown)"
DRAIN_LIMIT = 64 * 1024 * 1024


async def read_body(limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes without keeping them.

    An oversized body is still read (and dropped) up to ``DRAIN_LIMIT``: answering before the
    client finished sending makes the server close a socket with unread data, which resets
    the connection and the client never sees the 413.
    """
    too_large = BodyError(413, f"request body exceeds {limit} bytes", "request_too_large")
    declared = request.content_length
    if declared is not None and declared > DRAIN_LIMIT:
        raise too_large
    parts: list[bytes] = []
    size = 0
    async for chunk in request.body:
        size += len(chunk)
        if size > limit:
            parts.clear()
            if size > DRAIN_LIMIT:
                raise too_large
            continue
        parts.append(chunk)
    if size > limit:
        raise too_large
    return b"".join(parts)


def parse_json_object(raw: bytes) -> tuple[str, dict[str, Any]]:
    if not raw.strip():
        raise BodyError(400, "the request body is empty; send a JSON object", "invalid_json")
    try:
        text = raw.decode("utf-8")
        body = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BodyError(400, f"the request body is not valid JSON: {exc}", "invalid_json") from exc
    if not isinstance(body, dict):
        raise BodyError(400, "the request body must be a JSON object", "invalid_json")
    return text, body


def create_api_blueprint(state: BrokerState) -> Blueprint:
    bp = Blueprint("api", __name__)
    settings = state.settings
    hub = state.hub
    trusted_proxies = parse_networks(settings.trusted_proxies)

    def authenticate(rid: str) -> UserKey | Response:
        key = bearer(request.headers.get("Authorization"))
        if key is None:
            return error_response(
                401,
                "Missing API key: send 'Authorization: Bearer <key>'.",
                "authentication_error",
                code="missing_api_key",
                headers={REQUEST_ID_HEADER: rid},
            )
        user = state.keys.user(key)
        if user is None:
            return error_response(
                401,
                "Incorrect API key provided.",
                "authentication_error",
                code="invalid_api_key",
                headers={REQUEST_ID_HEADER: rid},
            )
        if user.blocked:
            return error_response(
                403,
                "This API key is blocked.",
                "permission_error",
                code="key_blocked",
                headers={REQUEST_ID_HEADER: rid, "x-should-retry": "false"},
            )
        return user

    def model_entry(model: str, owners: list[str]) -> dict[str, Any]:
        return {
            "id": model,
            "object": "model",
            "created": int(state.started),
            "owned_by": "remotellm",
            "connectors": len(owners),
        }

    @bp.get("/v1/models")
    async def list_models() -> Response:
        rid = request_id_for(request.headers.get(REQUEST_ID_HEADER))
        user = authenticate(rid)
        if isinstance(user, Response):
            return user
        live = hub.core.live_models()
        data = [model_entry(m, owners) for m, owners in sorted(live.items())]
        response = Response(
            json.dumps({"object": "list", "data": data}), content_type="application/json"
        )
        response.headers[REQUEST_ID_HEADER] = rid
        return response

    @bp.get("/v1/models/<path:model_id>")
    async def get_model(model_id: str) -> Response:
        rid = request_id_for(request.headers.get(REQUEST_ID_HEADER))
        user = authenticate(rid)
        if isinstance(user, Response):
            return user
        owners = hub.core.live_models().get(model_id)
        if owners is None:
            return error_response(
                404,
                f"The model '{quote(model_id)}' does not exist",
                "invalid_request_error",
                code="model_not_found",
                param="model",
                headers={REQUEST_ID_HEADER: rid},
            )
        response = Response(
            json.dumps(model_entry(model_id, owners)), content_type="application/json"
        )
        response.headers[REQUEST_ID_HEADER] = rid
        return response

    def record_usage(
        rid: str,
        user: UserKey,
        model: str,
        stream: bool,
        status: int,
        duration: float,
        connector: str | None,
        outcome: Outcome | None,
    ) -> None:
        if state.usage is None:
            return
        state.usage.record(
            UsageRecord(
                ts=time.time(),
                request_id=rid,
                user_id=user.id,
                model=model,
                connector=connector,
                status=status,
                stream=stream,
                tokens_in=outcome.tokens_in if outcome else None,
                tokens_out=outcome.tokens_out if outcome else None,
                ttfb_ms=outcome.ttfb_ms if outcome else None,
                duration_ms=round(duration * 1000.0, 3),
                bytes_out=outcome.bytes_out if outcome else 0,
                key_name=user.name,
            )
        )

    @bp.post("/v1/<path:rest>")
    async def relay(rest: str) -> Response:
        started = hub.clock()
        rid = request_id_for(request.headers.get(REQUEST_ID_HEADER))
        structlog.contextvars.bind_contextvars(request_id=rid)
        try:
            return await _relay(rest, rid, started)
        finally:
            structlog.contextvars.unbind_contextvars("request_id")

    async def _relay(rest: str, rid: str, started: float) -> Response:
        user = authenticate(rid)
        if isinstance(user, Response):
            return user
        if hub.core.draining:
            return error_response(
                503,
                "The broker is shutting down; retry shortly.",
                "server_error",
                code="shutting_down",
                headers={REQUEST_ID_HEADER: rid, "Retry-After": "2"},
            )
        try:
            raw = await read_body(settings.max_request_body)
            text, body = parse_json_object(raw)
        except BodyError as exc:
            return error_response(
                exc.status, exc.message, code=exc.code, headers={REQUEST_ID_HEADER: rid}
            )
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return error_response(
                400,
                "you must provide a model parameter",
                code="missing_model",
                param="model",
                headers={REQUEST_ID_HEADER: rid},
            )
        stream = body.get("stream") is True
        headers = {REQUEST_ID_HEADER: rid, "content-type": "application/json"}
        for name in _FORWARD_HEADERS:
            value = request.headers.get(name)
            if value:
                headers[name] = value
        item = RequestItem(
            request_id=rid,
            model=model,
            path="/v1/" + rest,
            body=text,
            headers=headers,
            stream=stream,
            timeout_s=settings.total_timeout,
        )
        try:
            pending, channel = hub.submit(item, user=user.id)
        except DispatchError as exc:
            extra = {REQUEST_ID_HEADER: rid}
            if exc.status == 503:
                extra["Retry-After"] = "2"
            shown = quote(model) if exc.status != 404 else UNKNOWN_MODEL_LABEL
            log.info("request_refused", model=quote(model), status=exc.status, code=exc.code)
            duration = hub.clock() - started
            # A client can name any model: unknown ones share one label, so /metrics stays small.
            state.metrics.request_done(shown, exc.status, None, duration)
            record_usage(rid, user, model, stream, exc.status, duration, None, None)
            return error_response(
                exc.status,
                exc.message,
                "invalid_request_error" if exc.status == 404 else "server_error",
                code=exc.code,
                param="model" if exc.status == 404 else None,
                headers=extra,
            )
        client = client_address(
            request.remote_addr, request.headers.get("X-Forwarded-For"), trusted_proxies
        )

        def done(outcome: Outcome) -> None:
            duration = hub.clock() - started
            ttfb = outcome.ttfb_ms / 1000.0 if outcome.ttfb_ms is not None else None
            state.metrics.request_done(model, outcome.status, ttfb, duration)
            connector = pending.connector
            record_usage(rid, user, model, stream, outcome.status, duration, connector, outcome)
            log.info(
                "request_done",
                request_id=rid,
                model=model,
                user=user.id,
                client=client,
                connector=pending.connector,
                stream=stream,
                status=outcome.status,
                ttfb_ms=outcome.ttfb_ms,
                duration_ms=round(duration * 1000.0, 3),
                overhead_ms=outcome.overhead_ms,
                bytes_out=outcome.bytes_out,
                error=outcome.error,
                attempts=pending.dispatches,
            )

        machine = ResponseMachine(
            pending=pending,
            stream=stream,
            started=started,
            commit_after=settings.stream_commit_after,
            heartbeat=settings.heartbeat,
        )
        responder = Responder(
            hub=hub, pending=pending, channel=channel, machine=machine, on_done=done
        )
        return await responder.respond()

    @bp.route("/v1/<path:rest>", methods=["GET", "PUT", "PATCH", "DELETE"])
    async def other(rest: str) -> Response:
        """Every /v1 path but the model list is relayed by POST: other methods get 405."""
        rid = request_id_for(request.headers.get(REQUEST_ID_HEADER))
        user = authenticate(rid)
        if isinstance(user, Response):
            return user
        return error_response(
            405,
            f"Method {request.method} is not allowed on /v1/{quote(rest)}; use POST",
            code="method_not_allowed",
            headers={REQUEST_ID_HEADER: rid, "Allow": "POST"},
        )

    return bp
