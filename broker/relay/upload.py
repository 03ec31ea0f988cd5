"""Applies a connector's upload frames to the waiting API handler's channel.

Used by both upload modes: stream mode feeds it one chunked body, parts mode feeds it the
parts in sequence order (``PartAssembler`` restores the order and drops repeats). The
request's progress (activity, head seen) is reported to the relay state, which owns it;
the frames go to a ``FrameSink`` (the API handler's channel in this process, or another
broker's inbox in the Redis mode: ``flush`` hands over each fed piece in one write).
"""

from __future__ import annotations

from broker.core import Failure, Pending, Seen
from broker.state.relay import Clock, FrameSink, RelayState
from shared.errors import FrameError
from shared.framing import FrameDecoder, FrameType, decode_end, decode_head


class UploadTooLarge(Exception):
    pass


class FrameApplier:
    __slots__ = ("_clock", "channel", "decoder", "done", "limit", "pending", "received", "state")

    def __init__(
        self,
        state: RelayState,
        clock: Clock,
        pending: Pending,
        channel: FrameSink,
        limit: int,
    ) -> None:
        self.state = state
        self._clock = clock
        self.pending = pending
        self.channel = channel
        self.decoder = FrameDecoder()
        self.limit = limit
        self.received = 0
        self.done = False

    @property
    def cancelled(self) -> bool:
        return self.state.is_cancelled(self.pending.id)

    def feed(self, data: bytes) -> None:
        """Apply every frame completed by ``data``. Raises FrameError, UploadTooLarge."""
        if self.done:
            return
        now = self._clock()
        self.state.progress(self.pending, Seen.FRAME, now)
        channel = self.channel
        for frame in self.decoder.feed(data):
            kind = frame.type
            if kind is FrameType.DATA:
                self.received += len(frame.payload)
                if self.received > self.limit:
                    raise UploadTooLarge(f"response exceeds {self.limit} bytes")
                channel.data(frame.payload)
            elif kind is FrameType.HEAD:
                self.state.progress(self.pending, Seen.HEAD, now)
                channel.head(decode_head(frame.payload))
            elif kind is FrameType.END:
                channel.end(decode_end(frame.payload))
                self.done = True
                return
            elif kind is FrameType.HEARTBEAT:  # the activity was recorded above
                channel.touch()
            else:
                raise FrameError(f"a {kind.name} frame inside one response's frames")

    async def flush(self) -> None:
        await self.channel.flush()

    async def abort(self, status: int, code: str, message: str) -> None:
        if not self.done:
            self.done = True
            self.channel.fail(Failure(status, code, message))
            await self.channel.flush()


DEFAULT_PARTS_BUFFER = 4 * 1024 * 1024


class PartAssembler:
    """Parts mode: apply parts in sequence order, exactly once.

    Parts that arrive ahead of their turn wait here: at most ``max_held`` of them and at
    most ``max_bytes`` in all, else the upload fails (FrameError), so a connector cannot
    make the broker hold more than that per request.
    """

    __slots__ = ("applier", "held", "held_bytes", "max_bytes", "max_held", "next_seq")

    def __init__(
        self, applier: FrameApplier, max_held: int = 256, max_bytes: int = DEFAULT_PARTS_BUFFER
    ) -> None:
        self.applier = applier
        self.next_seq = 0
        self.held: dict[int, bytes] = {}
        self.held_bytes = 0
        self.max_held = max_held
        self.max_bytes = max_bytes

    async def add(self, seq: int, data: bytes) -> bool:
        """Returns False for a repeated part (already applied or already held)."""
        if seq < self.next_seq or seq in self.held:
            return False
        if seq > self.next_seq:
            self._hold(seq, data)
            return True
        try:
            self.applier.feed(data)
            self.next_seq += 1
            while self.next_seq in self.held:
                part = self.held.pop(self.next_seq)
                self.held_bytes -= len(part)
                self.applier.feed(part)
                self.next_seq += 1
        finally:
            await self.applier.flush()
        return True

    def _hold(self, seq: int, data: bytes) -> None:
        if len(self.held) >= self.max_held:
            raise FrameError("too many parts out of order")
        if self.held_bytes + len(data) > self.max_bytes:
            raise FrameError(f"parts out of order exceed {self.max_bytes} bytes")
        self.held[seq] = data
        self.held_bytes += len(data)
