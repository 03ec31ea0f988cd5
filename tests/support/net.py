"""Free loopback ports and waiting for a server to listen."""

from __future__ import annotations

import asyncio
import socket
import time

# Every port handed out in this process. The kernel may hand a port just closed out again,
# so two calls could return one port; a test that picks ports for several processes
# before starting any of them then sees one fail with "address already in use".
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports, none handed out before in this process."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)  # held open while choosing: no two of these are equal
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
            if port not in _HANDED_OUT:
                ports.append(port)
        _HANDED_OUT.update(ports)
        return ports
    finally:
        for sock in socks:
            sock.close()


async def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port}") from None
            await asyncio.sleep(0.02)
        else:
            writer.close()
            await writer.wait_closed()
            return


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached in time")
        await asyncio.sleep(interval)


class TcpForwarder:
    """A loopback TCP forwarder that can cut chosen connections, as a proxy or a network
    would: ``cut(marker)`` aborts every connection whose client sent ``marker`` (e.g. the
    path of the multiplexed upload) in either direction at once."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: list[tuple[bytearray, asyncio.StreamWriter, asyncio.StreamWriter]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for _, a, b in self._conns:
            a.transport.abort()
            b.transport.abort()

    def cut(self, marker: bytes) -> int:
        cut = 0
        for seen, a, b in list(self._conns):
            if marker in seen:
                a.transport.abort()
                b.transport.abort()
                cut += 1
        return cut

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        seen = bytearray()
        entry = (seen, writer, up_writer)
        self._conns.append(entry)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            try:
                while data := await src.read(65536):
                    if record:
                        # Keep only the start of each request line: enough to find a path.
                        seen.extend(data[:256])
                        del seen[:-4096]
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        finally:
            self._conns.remove(entry)
