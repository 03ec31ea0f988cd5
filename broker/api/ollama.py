"""Ollama's native API (``/api/*``): relayed to connectors whose engine is Ollama.

``POST /api/chat``, ``/api/generate``, ``/api/embed``, ``/api/embeddings`` and
``/api/show`` are relayed like ``/v1`` requests (``OllamaRelay``: the same key check, body
limit, JSON checks, limits, queue, ledger and metrics) with Ollama's wire
(``broker.core.ollama``: NDJSON streams passed on as they arrive, usage from
``prompt_eval_count`` / ``eval_count``, errors as ``{"error": "..."}``). ``GET /api/tags``,
``/api/ps`` and ``/api/version`` are answered here from the live connectors
(``broker.api.ollama_catalog``). Routes that change the engine (pull, create, copy,
delete, push, blobs) are refused with 403 and never reach a connector; anything else
under ``/api/`` is a 404. Every path is checked by the one rule (``shared.paths``).
"""

from __future__ import annotations

import dataclasses
import json

from broker.accounts.keys import UserKey
from broker.api.input import ApiError, authenticate, new_request_id
from broker.api.ollama_catalog import ps_body, tags_body, utc_now, version_body
from broker.api.relay import ApiRelay, _header, _request_path
from broker.asgi import Receive, Scope, Send
from broker.broker_state import BrokerState
from broker.core.errors import BrokerError
from broker.core.ollama import OLLAMA
from broker.core.request_body import RequestBody, inspect
from broker.errors import send_error
from shared.errors import quote
from shared.logging import get_logger
from shared.model_names import shown
from shared.paths import (
    OLLAMA_ENGINE,
    OLLAMA_LOCAL,
    OLLAMA_PREFIX,
    OLLAMA_REFUSED,
    OLLAMA_RELAYED,
    PathRefused,
    engine_kind,
    ollama_route,
)
from shared.protocol import REQUEST_ID_HEADER, RequestItem

__all__ = ["OllamaApi", "OllamaRelay"]

log = get_logger("broker.api.ollama")

# Routes that generate, and so stream unless the body says "stream": false.
_STREAMING = frozenset({OLLAMA_PREFIX + "chat", OLLAMA_PREFIX + "generate"})


async def send_ollama_error(send: Send, exc: BaseException, headers: dict[str, str]) -> None:
    """The broker's status and headers for ``exc`` (``broker.errors``), Ollama's body."""
    await send_error(send, exc, headers, OLLAMA)


class OllamaRelay(ApiRelay):
    """The relayed Ollama routes: ``ApiRelay`` with Ollama's paths and engine check (its
    answers take Ollama's shape by their path: ``broker.core.route_shapes``)."""

    def route(self, path: str) -> str:
        if ollama_route(path) not in OLLAMA_RELAYED:
            raise PathRefused(404, "unknown_url", f"{path} is not relayed")
        return path

    def read(self, raw: bytes, path: str, ask_usage: bool) -> RequestBody:
        request = inspect(raw, self.json_limits, False, stream_default=path in _STREAMING)
        if request.stream and path not in _STREAMING:
            return dataclasses.replace(request, stream=False)  # Ollama answers them whole
        return request

    async def check_engine(
        self, rid: str, user: UserKey, item: RequestItem, started: float
    ) -> None:
        """A model served only by connectors that are not Ollama: 404. A model no session
        serves is left to the relay (404 unknown, or 503 while its connector is away)."""
        serving = [s for s in (await self.hub.view()).sessions.values() if item.model in s.models]
        if not serving or any(engine_kind(s.engine) == OLLAMA_ENGINE for s in serving):
            return
        self._refused(rid, user, item, 404, "not_ollama", started, known=True)
        raise ApiError(
            404,
            f"model {shown(item.model)} is not served by an Ollama engine here; "
            "use the OpenAI API (/v1) for it",
            "not_ollama",
            headers={REQUEST_ID_HEADER: rid},
        )


class OllamaApi:
    """Every request under ``/api/``, as plain ASGI."""

    def __init__(self, state: BrokerState) -> None:
        self.state = state
        self.relay = OllamaRelay(state)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid = new_request_id()
        headers = {REQUEST_ID_HEADER: rid}
        try:
            route = ollama_route(_request_path(scope))
            method = scope["method"]
            if route.split("/", 1)[0] in OLLAMA_REFUSED:
                raise ApiError(
                    403,
                    f"/api/{quote(route.split('/', 1)[0])} changes the engine's models: "
                    "this broker never relays it; ask the operator",
                    "route_refused",
                )
            if route in OLLAMA_RELAYED and method == "POST":
                await self.relay(scope, receive, send)
                return
            if route in OLLAMA_LOCAL and method == "GET":
                await self._local(route, scope, send, rid)
                return
            if route in OLLAMA_RELAYED or route in OLLAMA_LOCAL:
                raise ApiError(405, f"method {quote(method)} not allowed", "method_not_allowed")
            raise ApiError(404, f"{quote(OLLAMA_PREFIX + route)} not found", "unknown_url")
        except PathRefused as exc:
            await send_ollama_error(send, ApiError(exc.status, exc.message, exc.code), headers)
        except Exception as exc:
            if not isinstance(exc, BrokerError):
                log.exception("ollama_api_unhandled_error", error_type=type(exc).__name__)
            await send_ollama_error(send, exc, headers)

    async def _local(self, route: str, scope: Scope, send: Send, rid: str) -> None:
        authenticate(self.state.keys, _header(scope, b"authorization"), rid)
        view = await self.state.relay.view()
        if route == "tags":
            body: dict[str, object] | None = tags_body(view, utc_now())
        elif route == "ps":
            body = ps_body(view, utc_now())
        else:
            body = version_body(view)
        if body is None:
            raise ApiError(503, "no Ollama engine is connected right now", "no_connector")
        payload = json.dumps(body).encode()
        fields = {
            "content-type": "application/json; charset=utf-8",
            "content-length": str(len(payload)),
            REQUEST_ID_HEADER: rid,
        }
        encoded = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields.items()]
        await send({"type": "http.response.start", "status": 200, "headers": encoded})
        await send({"type": "http.response.body", "body": payload, "more_body": False})
