"""Relay endpoints for connectors (``/relay/v1/``): sessions, long-poll, uploads, probe."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from pydantic import ValidationError
from quart import Blueprint, Response, request

from broker.errors import error_response
from broker.keys import ConnectorIdentity, bearer
from broker.state import BrokerState
from shared.logging import get_logger
from shared.protocol import (
    PROTOCOL_VERSION,
    RELAY_PREFIX,
    ModelsUpdate,
    ProbeResult,
    RegisterRequest,
    RegisterResponse,
    UploadMode,
)

log = get_logger("broker.relay")


def _json(body: str, status: int = 200) -> Response:
    return Response(body, status=status, content_type="application/json")


def create_relay_blueprint(state: BrokerState) -> Blueprint:
    bp = Blueprint("relay", __name__, url_prefix=RELAY_PREFIX)
    settings = state.settings
    hub = state.hub

    def identify() -> ConnectorIdentity | Response:
        token = bearer(request.headers.get("Authorization"))
        ident = state.keys.connector(token) if token else None
        if ident is None:
            return error_response(
                401, "invalid connector token", "authentication_error", code="invalid_token"
            )
        return ident

    def unknown_session() -> Response:
        return error_response(
            404,
            "unknown session: register again",
            "invalid_request_error",
            code="session_unknown",
        )

    def owned(ident: ConnectorIdentity, session_id: str) -> bool:
        session = hub.dispatcher.sessions.get(session_id)
        return session is not None and session.owner == ident.id

    @bp.post("/sessions")
    async def register() -> Response:
        ident = identify()
        if isinstance(ident, Response):
            return ident
        try:
            req = RegisterRequest.model_validate_json(await request.get_data())
        except ValidationError as exc:
            return error_response(400, f"invalid registration: {exc}", code="invalid_request")
        if req.protocol != PROTOCOL_VERSION:
            return error_response(
                400,
                f"protocol {req.protocol} is not supported (broker speaks {PROTOCOL_VERSION})",
                code="protocol_mismatch",
            )
        mode = UploadMode.STREAM if req.upload_mode is UploadMode.AUTO else req.upload_mode
        session = hub.register(
            name=ident.name or req.name,
            models=req.models,
            capacity=req.capacity,
            version=req.version,
            upload_mode=mode,
            upstream_api_key=ident.upstream_api_key,
            owner=ident.id,
        )
        state.metrics.registrations.inc()
        log.info(
            "session_registered",
            session=session.id,
            connector=session.name,
            models=sorted(session.models),
            capacity=session.capacity,
            upload_mode=mode.value,
            version=req.version,
        )
        reply = RegisterResponse(
            session_id=session.id,
            poll_wait_s=settings.poll_wait,
            lease_s=settings.lease,
            session_ttl_s=settings.session_ttl,
            heartbeat_s=settings.heartbeat,
            upload_mode=mode,
            max_part_bytes=settings.max_part_bytes,
        )
        return _json(reply.model_dump_json())

    @bp.delete("/sessions/<session_id>")
    async def deregister(session_id: str) -> Response:
        ident = identify()
        if isinstance(ident, Response):
            return ident
        if not owned(ident, session_id):
            return unknown_session()
        hub.deregister(session_id)
        log.info("session_closed", session=session_id)
        return Response("", status=204)

    @bp.put("/sessions/<session_id>/models")
    async def update_models(session_id: str) -> Response:
        ident = identify()
        if isinstance(ident, Response):
            return ident
        if not owned(ident, session_id):
            return unknown_session()
        try:
            update = ModelsUpdate.model_validate_json(await request.get_data())
        except ValidationError as exc:
            return error_response(400, f"invalid models update: {exc}", code="invalid_request")
        hub.dispatcher.update_models(session_id, update.models, hub.clock())
        log.info("session_models", session=session_id, models=sorted(update.models))
        return Response("", status=204)

    @bp.post("/probe")
    async def probe() -> Response:
        """Measures whether a chunked body sent with gaps arrives incrementally."""
        ident = identify()
        if isinstance(ident, Response):
            return ident
        arrivals: list[float] = []
        size = 0
        async for chunk in request.body:
            if chunk:
                arrivals.append(time.perf_counter())
                size += len(chunk)
                if size > 1024 * 1024:
                    return error_response(413, "probe body too large", code="too_large")
        spread = (arrivals[-1] - arrivals[0]) * 1000.0 if arrivals else 0.0
        # The connector sends its pieces ~300 ms apart: a buffering proxy delivers them at once.
        result = ProbeResult(incremental=spread >= 100.0, chunks=len(arrivals), spread_ms=spread)
        return _json(result.model_dump_json())

    @bp.get("/probe")
    async def probe_download() -> Response:
        """Streams three pieces ~300 ms apart: does the path deliver a response as it comes?"""
        ident = identify()
        if isinstance(ident, Response):
            return ident

        async def pieces() -> AsyncIterator[bytes]:
            for i in range(3):
                if i:
                    await asyncio.sleep(0.3)
                yield b"probe" * 20 + b"\n"

        response = Response(pieces(), content_type="application/octet-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.timeout = None
        return response

    return bp
