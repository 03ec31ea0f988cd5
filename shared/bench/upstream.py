"""A fast fake OpenAI-compatible upstream for the benchmark (raw asyncio, one process).

The request body chooses the workload: ``max_tokens`` chunks of ``bench_chunk_bytes`` bytes,
``bench_delay_ms`` apart (0: written back to back). Run: ``python -m shared.bench.upstream
--port P``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json

_MODELS = json.dumps(
    {"object": "list", "data": [{"id": "bench", "object": "model", "owned_by": "bench"}]}
).encode()


def _event(index: int, size: int) -> bytes:
    # A chat.completion.chunk-like event padded to ``size`` bytes of content.
    head = (
        b'data: {"id":"b","object":"chat.completion.chunk",'
        b'"choices":[{"index":0,"delta":{"content":"'
    )
    tail = b'"}}]}\n\n'
    pad = max(1, size - len(head) - len(tail))
    return head + (b"%d" % index).ljust(pad, b"x")[:pad] + tail


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes] | None:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = 0
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        lname = name.strip().lower()
        if lname == "content-length":
            length = int(value.strip())
        elif lname == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if chunked:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = await reader.readexactly(length) if length else b""
    return method, path, body


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                req = await _read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if req is None:
                return
            method, path, body = req
            if method == "GET" and path.startswith("/v1/models"):
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                writer.write(head + b"Content-Length: %d\r\n\r\n" % len(_MODELS) + _MODELS)
                await writer.drain()
                continue
            params = json.loads(body or b"{}")
            n = int(params.get("max_tokens", 10))
            size = int(params.get("bench_chunk_bytes", 64))
            delay = float(params.get("bench_delay_ms", 0)) / 1000.0
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            for i in range(n):
                event = _event(i, size)
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                if delay:
                    await writer.drain()
                    await asyncio.sleep(delay)
            done = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def serve(port: int) -> None:
    server = await asyncio.start_server(_handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
