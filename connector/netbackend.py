"""An asyncio-native network backend for httpx (via httpcore's backend interface).

httpx's default backend goes through anyio and wraps every socket read and write in a
cancel scope (``anyio.fail_after``), which is most of what a relayed chunk costs the
connector: each chunk is one read from the LLM and one write to the broker. This backend
is a plain asyncio ``Protocol``: a read is a buffer slice or one future, a timeout is one
``call_later`` only when one is set. Errors are httpcore's, so httpx maps them as usual.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterable
from typing import Any, cast

import httpcore
import httpx
from httpcore._backends.base import SOCKET_OPTION

_HIGH_WATER = 1 << 20  # stop reading from the socket past 1 MiB unread


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.reader: asyncio.Future[None] | None = None
        self.drainer: asyncio.Future[None] | None = None
        self.paused_writing = False
        self.paused_reading = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > _HIGH_WATER and self.transport is not None:
            self.paused_reading = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake_reader()
        self.paused_writing = False
        drainer = self.drainer
        if drainer is not None and not drainer.done():
            drainer.set_result(None)

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        drainer = self.drainer
        if drainer is not None and not drainer.done():
            drainer.set_result(None)

    def _wake_reader(self) -> None:
        reader = self.reader
        if reader is not None and not reader.done():
            reader.set_result(None)


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


async def _wait(future: asyncio.Future[None], timeout: float | None) -> None:
    if timeout is None:
        await future
        return
    handle = asyncio.get_running_loop().call_later(timeout, _expire, future)
    try:
        await future
    finally:
        handle.cancel()


class AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, protocol: _Protocol) -> None:
        self._protocol = protocol
        self._loop = asyncio.get_running_loop()

    @property
    def _transport(self) -> asyncio.Transport:
        transport = self._protocol.transport
        assert transport is not None
        return transport

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        proto = self._protocol
        if not proto.buffer and not proto.eof:
            proto.reader = self._loop.create_future()
            try:
                await _wait(proto.reader, timeout)
            except TimeoutError as exc:
                raise httpcore.ReadTimeout("timed out reading") from exc
            finally:
                proto.reader = None
        buffer = proto.buffer
        if buffer:
            if len(buffer) <= max_bytes:
                data = bytes(buffer)
                buffer.clear()
            else:
                data = bytes(buffer[:max_bytes])
                del buffer[:max_bytes]
            if proto.paused_reading and len(buffer) < _HIGH_WATER // 2:
                proto.paused_reading = False
                self._transport.resume_reading()
            return data
        if proto.error is not None and not isinstance(proto.error, ssl.SSLError):
            raise httpcore.ReadError(str(proto.error) or "connection lost")
        return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        proto = self._protocol
        transport = self._transport
        if transport.is_closing():
            raise httpcore.WriteError(str(proto.error or "connection closed"))
        transport.write(buffer)
        if proto.paused_writing:
            proto.drainer = self._loop.create_future()
            try:
                await _wait(proto.drainer, timeout)
            except TimeoutError as exc:
                raise httpcore.WriteTimeout("timed out writing") from exc
            finally:
                proto.drainer = None
            if proto.error is not None:
                raise httpcore.WriteError(str(proto.error))

    async def aclose(self) -> None:
        transport = self._protocol.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            transport = await self._loop.start_tls(
                self._transport,
                self._protocol,
                ssl_context,
                server_hostname=server_hostname,
                ssl_handshake_timeout=timeout,
            )
        except TimeoutError as exc:
            await self.aclose()
            raise httpcore.ConnectTimeout("TLS handshake timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            await self.aclose()
            raise httpcore.ConnectError(str(exc)) from exc
        if transport is None:
            raise httpcore.ConnectError("TLS handshake failed")
        self._protocol.transport = transport
        return self

    def get_extra_info(self, info: str) -> Any:
        transport = self._protocol.transport
        if transport is None:
            return None
        if info == "ssl_object":
            return transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return transport.get_extra_info("sockname")
        if info == "server_addr":
            return transport.get_extra_info("peername")
        if info == "socket":
            return transport.get_extra_info("socket")
        if info == "is_readable":
            # An idle keep-alive connection with data or EOF waiting is no longer usable.
            proto = self._protocol
            return proto.eof or bool(proto.buffer)
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        protocol = _Protocol()
        local = (local_address, 0) if local_address else None
        try:
            async with asyncio.timeout(timeout):
                transport, _ = await loop.create_connection(
                    lambda: protocol, host, port, local_addr=local
                )
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"timed out connecting to {host}:{port}") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        # uvloop may call connection_made after create_connection returns: set it here too.
        protocol.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            for option in socket_options or ():
                sock.setsockopt(*option)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return AsyncioStream(protocol)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        protocol = _Protocol()
        try:
            async with asyncio.timeout(timeout):
                transport, _ = await loop.create_unix_connection(lambda: protocol, path)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"timed out connecting to {path}") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        protocol.transport = transport
        return AsyncioStream(protocol)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def use_asyncio_backend(transport: httpx.AsyncHTTPTransport) -> httpx.AsyncHTTPTransport:
    """Swap the transport's network backend for ``AsyncioBackend`` (works for proxies too)."""
    pool = getattr(transport, "_pool", None)
    if pool is not None and hasattr(pool, "_network_backend"):
        pool._network_backend = AsyncioBackend()
    return transport


class ShardedTransport(httpx.AsyncBaseTransport):
    """Spreads requests over several connection pools.

    httpcore scans every connection of a pool on each request it assigns, so one pool
    holding ~1,000 streams costs O(n) per request and chunk; pools of a few dozen keep
    that scan short.
    """

    def __init__(self, shards: list[httpx.AsyncHTTPTransport]) -> None:
        self._shards = shards
        self._next = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        shard = self._shards[self._next]
        self._next = (self._next + 1) % len(self._shards)
        return await shard.handle_async_request(request)

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()


def fast_transport(
    connections: int, per_shard: int = 32, keepalive_expiry: float = 5.0, **options: Any
) -> httpx.AsyncBaseTransport:
    """An httpx transport on ``AsyncioBackend``, sharded for many concurrent requests."""
    count = max(1, -(-connections // per_shard))
    size = -(-connections // count)
    # One TLS context for every shard: httpx would otherwise load the CA bundle per pool
    # (~1 MiB each, 70 pools at a capacity of 1,000).
    if options.get("verify", True) is True:
        options["verify"] = httpx.create_ssl_context()
    shards = [
        use_asyncio_backend(
            httpx.AsyncHTTPTransport(
                limits=httpx.Limits(
                    max_connections=size,
                    max_keepalive_connections=size,
                    keepalive_expiry=keepalive_expiry,
                ),
                **options,
            )
        )
        for _ in range(count)
    ]
    return shards[0] if count == 1 else ShardedTransport(shards)
