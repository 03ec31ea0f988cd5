"""A minimal HTTP/1.1 load client on asyncio streams.

The benchmark's own client must cost far less than what it measures, so it parses just
enough HTTP (status line, headers, chunked or sized body) and timestamps the first and last
body bytes. The same client drives the direct and the relayed runs.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
import time
from dataclasses import dataclass


@dataclass(slots=True)
class Result:
    ok: bool
    status: int
    ttfb: float  # seconds to the first body byte
    ttlb: float  # seconds to the last body byte
    body_bytes: int
    events: int
    error: str | None = None
    # Wall-clock marks (time.time_ns, comparable with the processes' --trace-hops marks)
    # and the broker's x-request-id, which joins them.
    sent_ns: int = 0
    first_ns: int = 0
    request_id: str | None = None


class Connection:
    def __init__(self, host: str, port: int, ssl: ssl_module.SSLContext | None = None) -> None:
        self.host = host
        self.port = port
        self.ssl = ssl
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _ensure(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(
                self.host, self.port, limit=1 << 20, ssl=self.ssl
            )
        return self._reader, self._writer

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            self._writer = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Result:
        started = time.perf_counter()
        sent_ns = time.time_ns()
        try:
            reader, writer = await self._ensure()
            lines = [f"POST {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
            lines += [f"{k}: {v}" for k, v in headers.items()]
            lines.append(f"Content-Length: {len(body)}")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            chunked = b"chunked" in head.lower()
            length = 0
            request_id = None
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:].strip())
                elif line[:13].lower() == b"x-request-id:":
                    request_id = line[13:].strip().decode("latin-1")
            keep = b"connection: close" not in head.lower()
            first = 0.0
            first_ns = 0
            size = 0
            events = 0
            if chunked:
                while True:
                    size_line = await reader.readuntil(b"\r\n")
                    n = int(size_line.split(b";")[0], 16)
                    if n == 0:
                        await reader.readuntil(b"\r\n")
                        break
                    data = await reader.readexactly(n + 2)
                    if not first:
                        first = time.perf_counter()
                        first_ns = time.time_ns()
                    size += n
                    events += data.count(b"\n\n")
            elif length:
                data = await reader.readexactly(length)
                first = time.perf_counter()
                first_ns = time.time_ns()
                size = length
                events = data.count(b"\n\n")
            last = time.perf_counter()
            if not keep:
                await self.close()
            return Result(
                ok=200 <= status < 300,
                status=status,
                ttfb=(first or last) - started,
                ttlb=last - started,
                body_bytes=size,
                events=events,
                error=None if status < 300 else f"HTTP {status}",
                sent_ns=sent_ns,
                first_ns=first_ns,
                request_id=request_id,
            )
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            await self.close()
            now = time.perf_counter() - started
            return Result(False, 0, now, now, 0, 0, f"{type(exc).__name__}: {exc}")
