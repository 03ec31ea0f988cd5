"""One HTTP/1.1 request written byte for byte: the request target exactly as given.

httpx (like every client) resolves ``.`` and ``..`` segments before sending; an attacker's
client does not, so the path tests write the request line themselves.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(
    port: int,
    target: str,
    *,
    method: str = "POST",
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 20.0,
) -> RawResponse:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append(f"Content-Length: {len(body)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()
    try:
        data = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    return _parse(data)


def _parse(data: bytes) -> RawResponse:
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(line.split(": ", 1)) for line in header_lines]
    pairs = [(k, v) for k, v in headers]  # type: ignore[misc]
    chunked = any(k.lower() == "transfer-encoding" and "chunked" in v for k, v in pairs)
    return RawResponse(int(status_line.split()[1]), pairs, _unchunk(rest) if chunked else rest)


def _unchunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)
