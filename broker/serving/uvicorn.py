"""Serve one port with uvicorn and httptools (HTTP/1.1 parsed in C), inside our own loop.

uvicorn's ``Server.serve()`` installs its own SIGINT/SIGTERM handlers (``capture_signals``)
and exits the process on a bind or startup failure; the broker keeps its own signal
handlers and drain (broker/server.py), so this runs the public steps ``startup`` /
``on_tick`` / ``shutdown`` itself, on a socket it binds (a bind failure raises OSError).

Every accepted connection gets ``TCP_NODELAY``. asyncio's own loop sets it only for
sockets it created with ``IPPROTO_TCP``, and one bound here (``socket.create_server``,
protocol 0) is not one: without uvloop (Windows, ``REMOTELLM_EVENT_LOOP=asyncio``) each
first byte then waited out a delayed ACK, +45 ms at one stream.

uvicorn has no head timeout (its keep-alive timer is cancelled by any byte, so a head
trickled a byte at a time would hold a socket for ever), no read timeout and no bound on
the head with httptools: ``_BoundedHttpTools`` adds the three Hypercorn has. One sweep per
event loop checks every connection's deadline twice a second, instead of a timer per
connection; a connection past its deadline is closed within ``SWEEP_EVERY`` of it. Its
state is one slotted attribute (``_Deadline``, which says why).
"""

from __future__ import annotations

import asyncio
import socket
import weakref
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import Server

from broker.asgi import ASGIApp
from broker.serving import (
    GRACEFUL_TIMEOUT,
    MAX_HEAD_BYTES,
    Listen,
    ShutdownTrigger,
)

_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-length: 0\r\nconnection: close\r\n\r\n"
)
# Hypercorn's TLS ciphers, so either server offers the same.
_CIPHERS = "ECDHE+AESGCM"
SWEEP_EVERY = 0.5  # seconds between two checks of every connection's deadline


class _Sweep:
    """Closes the connections of one event loop that are past their deadline."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._conns: set[_BoundedHttpTools] = set()
        self._handle: asyncio.TimerHandle | None = None

    def add(self, conn: _BoundedHttpTools) -> None:
        self._conns.add(conn)
        if self._handle is None:
            self._handle = self._loop.call_later(SWEEP_EVERY, self._run)

    def discard(self, conn: _BoundedHttpTools) -> None:
        self._conns.discard(conn)

    def _run(self) -> None:
        now = self._loop.time()
        for conn in [c for c in self._conns if c.expired(now)]:
            self._conns.discard(conn)
            conn.expire()
        self._handle = self._loop.call_later(SWEEP_EVERY, self._run) if self._conns else None


_SWEEPS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Sweep] = weakref.WeakKeyDictionary()


def _sweep(loop: asyncio.AbstractEventLoop) -> _Sweep:
    sweep = _SWEEPS.get(loop)
    if sweep is None:
        sweep = _SWEEPS[loop] = _Sweep(loop)
    return sweep


class _Deadline:
    """One connection's timeout state: a single attribute on uvicorn's protocol.

    Each attribute added to the protocol's instance dict counts: uvicorn's own 27 share
    their keys between instances, and past 30 the dict becomes a table of its own, 1.3 KiB
    more per connection (five attributes did that; measured with tracemalloc).
    """

    __slots__ = ("head_bytes", "limit", "reading_head", "since")

    def __init__(self, limit: float, now: float) -> None:
        self.reading_head = True
        self.head_bytes = 0
        self.limit = limit
        self.since = now


class _BoundedHttpTools(HttpToolsProtocol):
    """httptools with a head timeout, a read timeout and a head size bound.

    While a head is being read the deadline runs from accept (or the end of the previous
    response) and bytes do not move it; while a request is in flight it runs from the last
    byte the client sent. Past it the connection is closed without an answer."""

    header_timeout: float = 30.0
    read_timeout: float = 31.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        _no_delay(transport)
        super().connection_made(transport)
        self._deadline = _Deadline(self.header_timeout, self.loop.time())
        _sweep(self.loop).add(self)

    def expired(self, now: float) -> bool:
        return now - self._deadline.since >= self._deadline.limit

    def expire(self) -> None:
        """Past the deadline: closed without an answer."""
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        deadline = self._deadline
        if deadline.reading_head:
            deadline.head_bytes += len(data)
        else:
            deadline.since = self.loop.time()
        super().data_received(data)
        if (
            deadline.reading_head
            and deadline.head_bytes > MAX_HEAD_BYTES
            and not self.transport.is_closing()
        ):
            self.transport.write(_HEAD_TOO_LARGE)
            self.transport.close()

    def on_headers_complete(self) -> None:
        deadline = self._deadline
        deadline.reading_head = False
        deadline.limit = self.read_timeout
        deadline.since = self.loop.time()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        next_in_flight = bool(self.pipeline)
        super().on_response_complete()
        if next_in_flight or self.transport.is_closing():
            return
        deadline = self._deadline
        deadline.reading_head = True
        deadline.head_bytes = 0
        deadline.limit = self.header_timeout
        deadline.since = self.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        _sweep(self.loop).discard(self)
        super().connection_lost(exc)


def _no_delay(transport: asyncio.Transport) -> None:
    """Small writes go out at once (no Nagle), whichever event loop made the transport."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # already closed by the peer: nothing to speed up
            pass


def _protocol(listen: Listen) -> type[_BoundedHttpTools]:
    return type(
        "BoundedHttpTools",
        (_BoundedHttpTools,),
        {"header_timeout": listen.header_timeout, "read_timeout": listen.read_timeout},
    )


def uvicorn_config(app: ASGIApp, listen: Listen) -> Config:
    tls: dict[str, Any] = {}
    if listen.certfile is not None and listen.keyfile is not None:
        tls = {
            "ssl_certfile": str(listen.certfile),
            "ssl_keyfile": str(listen.keyfile),
            "ssl_ciphers": _CIPHERS,
        }
    return Config(
        app,
        host=listen.host,
        port=listen.port,
        http=_protocol(listen),
        ws="none",
        lifespan="on",  # the broker's state and loops start and stop with the app
        interface="asgi3",
        log_config=None,  # logs go through shared/logging's stdlib handler
        access_log=False,
        proxy_headers=False,  # broker/forwarded.py decides whom to trust
        server_header=False,
        date_header=True,
        backlog=listen.backlog,
        # A backstop only: _BoundedHttpTools closes an idle connection first.
        timeout_keep_alive=int(listen.header_timeout) + 1,
        timeout_graceful_shutdown=int(GRACEFUL_TIMEOUT),
        **tls,
    )


def _bind(listen: Listen) -> socket.socket:
    v6 = ":" in listen.host
    return socket.create_server(
        (listen.host, listen.port),
        family=socket.AF_INET6 if v6 else socket.AF_INET,
        backlog=listen.backlog,
        dualstack_ipv6=v6 and socket.has_dualstack_ipv6(),
    )


async def serve(app: ASGIApp, listen: Listen, shutdown_trigger: ShutdownTrigger) -> None:
    config = uvicorn_config(app, listen)
    config.load()
    server = Server(config)
    server.lifespan = config.lifespan_class(config)
    sock = _bind(listen)
    try:
        await server.startup(sockets=[sock])
    except SystemExit as exc:  # uvicorn's answer to a failed app startup (logged)
        sock.close()
        raise RuntimeError("the broker app failed to start; see the log above") from exc
    stop = asyncio.ensure_future(shutdown_trigger())
    try:
        while True:
            await server.on_tick(0)  # the Date header, once a second
            done, _ = await asyncio.wait({stop}, timeout=1.0)
            if done:
                break
    finally:
        stop.cancel()
        await server.shutdown(sockets=[sock])
