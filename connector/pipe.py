"""``FramePipe``: frames from the upstream reader to the uploader, with heartbeats.

The reader pushes frames without awaiting; the uploader takes everything buffered at once
(frames that arrive in the same tick travel in one write) or, after ``heartbeat`` seconds
of silence, gets a heartbeat frame so no proxy idle timeout cuts the upload.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from shared import framing
from shared.protocol import ResponseEnd, ResponseHead


class FrameSink(Protocol):
    """Where the upstream pump puts a response: a ``FramePipe`` (one upload per response)
    or a ``connector.mux.MuxStream`` (the multiplexed upload)."""

    def head(self, head: ResponseHead) -> None: ...

    def data(self, chunk: bytes) -> None: ...

    def end(self, end: ResponseEnd) -> None: ...


class FramePipe:
    __slots__ = ("_buf", "_loop", "_waiter", "ended", "has_data", "heartbeat")

    def __init__(self, heartbeat: float) -> None:
        self._buf: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self.heartbeat = heartbeat
        self.ended = False
        self.has_data = False

    def _push(self, frame: bytes) -> None:
        self._buf.append(frame)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def head(self, head: ResponseHead) -> None:
        self._push(framing.encode_head(head))

    def data(self, chunk: bytes) -> None:
        if chunk:
            self.has_data = True
            self._push(framing.encode_data(chunk))

    def end(self, end: ResponseEnd) -> None:
        if not self.ended:
            self._push(framing.encode_end(end))
            self.ended = True

    def heartbeat_frame(self) -> None:
        self._push(framing.HEARTBEAT_FRAME)

    @property
    def buffered(self) -> bool:
        return bool(self._buf)

    def drain(self) -> bytes:
        buf = self._buf
        if not buf:
            return b""
        out = buf[0] if len(buf) == 1 else b"".join(buf)
        buf.clear()
        return out

    async def get(self, timeout: float) -> bytes:
        """Buffered frames, or b"" if nothing came within ``timeout``."""
        if not self._buf and not self.ended:
            waiter = self._loop.create_future()
            self._waiter = waiter
            handle = self._loop.call_later(timeout, _resolve, waiter)
            try:
                await waiter
            finally:
                handle.cancel()
                self._waiter = None
        return self.drain()

    async def frames(self) -> AsyncIterator[bytes]:
        """Stream mode: the upload body, ending after the END frame."""
        while True:
            out = await self.get(self.heartbeat)
            if out:
                yield out
            elif not self.ended:
                yield framing.HEARTBEAT_FRAME
            if self.ended and not self._buf:
                return


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
