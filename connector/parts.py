"""Parts mode: a response as small sequenced POSTs, for paths that buffer request bodies.

The first part goes at once (it acknowledges the lease, even before the LLM answers), then
one every ~100 ms (docs/protocol.md: 100-250 ms) with what the pipe holds, never more
than ``max_part_bytes`` each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from connector.pipe import FramePipe
from shared import framing
from shared.protocol import RegisterResponse, RequestItem, UploadResult

PART_INTERVAL = 0.1  # seconds between parts after the first

SendPart = Callable[[str, str, int, bytes], Awaitable[UploadResult]]


class _Parts:
    """Numbers the parts of one response and sends them; ``cancelled`` once the broker
    says the request is gone."""

    def __init__(self, send: SendPart, session: RegisterResponse, item: RequestItem) -> None:
        self._send = send
        self._sid, self._rid = session.session_id, item.request_id
        self._limit = session.max_part_bytes
        self.seq = 0
        self.cancelled = False

    async def send(self, data: bytes) -> None:
        # Never more than max_part_bytes per POST (frames may span parts): proxies cap
        # request bodies (nginx: 1 MiB), and a burst from the LLM can be far larger.
        limit = self._limit
        for start in range(0, len(data), limit):
            piece = data if len(data) <= limit else data[start : start + limit]
            result = await self._send(self._sid, self._rid, self.seq, piece)
            self.seq += 1
            if result.status == "cancelled":
                self.cancelled = True
                return


async def upload_parts(
    send: SendPart, item: RequestItem, session: RegisterResponse, pipe: FramePipe
) -> None:
    parts = _Parts(send, session, item)
    loop = asyncio.get_running_loop()
    await parts.send(framing.HEARTBEAT_FRAME)  # part 0 acknowledges the lease at once
    last_sent = loop.time()
    data_sent = False
    while not parts.cancelled:
        chunk = await pipe.get(session.heartbeat_s)
        blob = bytearray(chunk or framing.HEARTBEAT_FRAME)
        if data_sent and not pipe.ended:
            wait = PART_INTERVAL - (loop.time() - last_sent)
            if wait > 0 and len(blob) < session.max_part_bytes:
                await asyncio.sleep(wait)
                blob += pipe.drain()
        await parts.send(bytes(blob))
        if parts.cancelled:
            return
        last_sent = loop.time()
        data_sent = data_sent or pipe.has_data
        if pipe.ended and not pipe.buffered:
            return
