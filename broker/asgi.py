"""The broker's one port: ``/relay/v1/*`` to the relay app, everything else to Quart."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from shared.protocol import RELAY_PREFIX

ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]

_PREFIX = RELAY_PREFIX + "/"


class BrokerASGI:
    __slots__ = ("quart", "relay")

    def __init__(self, quart: ASGIApp, relay: ASGIApp) -> None:
        self.quart = quart
        self.relay = relay

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(_PREFIX):
            await self.relay(scope, receive, send)
        else:
            await self.quart(scope, receive, send)
