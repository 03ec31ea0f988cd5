"""uvicorn's connections: small writes go out at once on asyncio's own loop too, and the
broker's per-connection state keeps uvicorn's protocol light.

asyncio sets TCP_NODELAY only on sockets it made with IPPROTO_TCP; the broker binds its
own (``socket.create_server``, protocol 0), so without uvloop (Windows, or
``REMOTELLM_EVENT_LOOP=asyncio``) every first byte waited out a delayed ACK (+45 ms at one
stream). pytest-asyncio runs asyncio's own loop, as those users do.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from uvicorn.server import ServerState

from broker.serving import Listen
from broker.serving.uvicorn import _bind, uvicorn_config


async def _app(scope: Any, receive: Any, send: Any) -> None:  # never called here
    raise AssertionError("no request is sent")


class _Plain(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport


async def _accepted(factory: Any, sock: socket.socket) -> tuple[int, asyncio.BaseProtocol]:
    """TCP_NODELAY of the accepted socket, and the protocol serving it."""
    made: list[asyncio.BaseProtocol] = []

    def protocol() -> asyncio.BaseProtocol:
        made.append(factory())
        return made[-1]

    loop = asyncio.get_running_loop()
    server = await loop.create_server(protocol, sock=sock)
    host, port = sock.getsockname()[:2]
    _, writer = await asyncio.open_connection(host, port)
    try:
        for _ in range(200):
            transport = getattr(made[0], "transport", None) if made else None
            if transport is not None:
                accepted = transport.get_extra_info("socket")
                nodelay = accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                return int(nodelay), made[0]
            await asyncio.sleep(0.01)
        raise AssertionError("the server never accepted the connection")
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


async def test_the_broker_sets_tcp_nodelay_where_asyncio_does_not() -> None:
    listen = Listen(host="127.0.0.1", port=0, header_timeout=5.0, read_timeout=5.0, backlog=8)
    # asyncio alone leaves Nagle on for a socket bound this way: what the fix is for.
    assert (await _accepted(_Plain, _bind(listen)))[0] == 0

    config = uvicorn_config(_app, listen)
    config.load()
    state = ServerState()

    def uvicorn_protocol() -> asyncio.BaseProtocol:
        made: asyncio.BaseProtocol = config.http_protocol_class(  # type: ignore[call-arg]
            config=config, server_state=state, app_state={}
        )
        return made

    nodelay, protocol = await _accepted(uvicorn_protocol, _bind(listen))
    assert nodelay == 1
    # CPython shares the keys of instance dicts up to 30 attributes; past that each
    # connection's dict is a table of its own (+1.3 KiB: five attributes of ours did that).
    assert len(vars(protocol)) <= 30, sorted(vars(protocol))
