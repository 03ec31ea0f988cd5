"""The broker's one port: the relay and the relayed API as plain ASGI, the rest to Quart.

``/relay/v1/*`` goes to the relay app, ``POST /v1/*`` (every relayed API request) to the
API relay, ``/api/*`` (Ollama's native API) to its app; Quart serves the model list, the
pages and everything else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from shared.protocol import RELAY_PREFIX

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]

_PREFIX = RELAY_PREFIX + "/"
_API = "/v1/"
_OLLAMA = "/api/"


class BrokerASGI:
    __slots__ = ("api", "ollama", "quart", "relay")

    def __init__(
        self, quart: ASGIApp, relay: ASGIApp, api: ASGIApp, ollama: ASGIApp | None = None
    ) -> None:
        self.quart = quart
        self.relay = relay
        self.api = api
        self.ollama = ollama

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.startswith(_PREFIX):
                await self.relay(scope, receive, send)
                return
            if scope["method"] == "POST" and path.startswith(_API):
                await self.api(scope, receive, send)
                return
            if self.ollama is not None and path.startswith(_OLLAMA):
                await self.ollama(scope, receive, send)
                return
        await self.quart(scope, receive, send)
