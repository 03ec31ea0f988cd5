"""The multiplexed upload: one long-lived POST carries the frames of every response.

Granted at registration (protocol revision 2, ``mux_upload``), it replaces a POST per
response where the path streams request bodies: the connector opens it before work
arrives, each request writes its frames into its ``MuxStream`` (the pump treats it like a
``FramePipe``), and one writer sends what every stream has pending in one write per wake,
each run of one response's frames tagged with its request ID (``shared.framing``).

- A request's first frame acknowledges its lease: its head when the upstream answers
  within ``ack_after`` (``ACK_GRACE``, at most a tenth of the lease), else an empty
  heartbeat then. Sending the ACK at once cost the first byte about a millisecond at one
  stream: its write, and the broker's read of it, ran exactly while the upstream call was
  under way (docs/performance.md, "The first byte, hop by hop").
- Each request still gets a heartbeat after ``heartbeat`` seconds of silence (the broker's
  idle timeout stays per request); the upload gets one when nothing at all was sent.
- An upload ends cleanly with ``CLOSE`` (after ``rotate_bytes``, because proxies limit
  request bodies — nginx: 1 MiB — or when the connector stops); the next one opens once
  the broker answered, and unfinished responses continue on it. Runs hold whole frames
  (``take_frames``), so no upload ends mid-frame: a load balancer may send the next one to
  another broker, which decodes it from its first byte.
- An upload that fails (the connection was cut, the broker restarted) loses the requests
  whose answer's frames it carried: their tasks are cancelled, which closes their upstream
  calls, and the broker ends them for their users as it does a cut per-request upload.
  The next upload carries an END ``connector_lost`` for each of them, so a user whose
  broker is alive learns it at once (not when the dead broker's heartbeat runs out);
  where that broker already failed the request, the END is refused and dropped.
  Requests that had sent nothing of their answer yet (at most the heartbeat that
  acknowledges the lease) go out on the next upload, whichever broker receives it: it
  acknowledges them again, so a broker that died holding only their acknowledgement
  costs them nothing (not a lease's wait for a redispatch).

Nothing here speaks HTTP: ``send`` (``BrokerClient.upload_mux`` for one session) posts a
body and raises the connector's own errors.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from connector.backoff import Backoff
from connector.errors import BrokerRejected, BrokerUnavailable, LeaseLost, SessionLost
from shared import framing
from shared.hoptrace import HopTrace
from shared.logging import get_logger
from shared.protocol import ResponseEnd, ResponseHead, UploadResult

log = get_logger("connector.mux")

Send = Callable[[AsyncIterator[bytes]], Awaitable[UploadResult]]

# End an upload cleanly after this many bytes: below the 1 MiB body limit of a default
# nginx, with room for the last write.
ROTATE_BYTES = 768 * 1024
MAX_RUN = 256 * 1024  # bytes of one response per MUX frame
# Bytes of one response per write: a response that floods (a fast LLM, a large answer)
# takes turns with the others instead of holding the shared upload for all it has.
FAIR_SHARE = 64 * 1024
GIVE_UP_AFTER = 3  # failed uploads in a row that carried nothing: fall back per request
# Seconds a new request's ACK waits for the upstream's head to travel with it.
ACK_GRACE = 0.05
CANCELLED_END = ResponseEnd(
    ok=False, status=499, error_type="cancelled", error="the connector stopped this request"
)
LOST_END = ResponseEnd(
    ok=False, status=502, error_type="connector_lost", error="the upload carrying it was cut"
)


class MuxStream:
    """One response on the multiplexed upload: ``head``, ``data``, ``end`` like a pipe."""

    __slots__ = (
        "_mux",
        "answered",
        "dead",
        "ended",
        "lane",
        "last_sent",
        "on_lost",
        "request_id",
        "tag",
    )

    def __init__(self, mux: MuxUploader, request_id: str, on_lost: Callable[[], object]) -> None:
        self._mux = mux
        self.request_id = request_id
        self.tag = request_id.encode("ascii")
        self.on_lost = on_lost
        self.lane = 0  # the upload that carries its frames (0: none yet)
        self.ended = False
        self.dead = False  # lost, or replaced by a new attempt: its frames are dropped
        self.answered = False  # a frame of the answer (not only heartbeats) went out
        self.last_sent = 0.0

    def head(self, head: ResponseHead) -> None:
        self._mux.push(self, framing.encode_head(head))

    def data(self, chunk: bytes) -> None:
        if chunk:
            self._mux.push(self, framing.encode_data(chunk))

    def end(self, end: ResponseEnd) -> None:
        if not self.ended:
            self.ended = True
            self._mux.push(self, framing.encode_end(end))

    def close(self) -> None:
        """The request's task is over: end it for the broker if the pump did not."""
        if not self.ended and not self.dead:
            self.end(CANCELLED_END)


class MuxUploader:
    """The multiplexed uploads of one session, one after another, for its lifetime."""

    def __init__(
        self,
        send: Send,
        heartbeat: float,
        rotate_bytes: int = ROTATE_BYTES,
        trace: HopTrace | None = None,
        ack_after: float = ACK_GRACE,
    ) -> None:
        self._trace = trace
        self._send = send
        self.heartbeat = heartbeat
        self.ack_after = ack_after
        self.rotate_bytes = rotate_bytes
        self.streams: dict[str, MuxStream] = {}
        self._dirty: dict[MuxStream, list[bytes]] = {}
        self._waiter: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._lane = 0
        self._failures = 0
        self._carried = False  # the current upload carried a response's frames
        self.uploads = 0  # uploads opened (the first, then one per rotation or failure)
        self.usable = True  # False: the path keeps refusing it; use per-request uploads
        self._task: asyncio.Task[None] | None = None

    # -- what requests use ----------------------------------------------------------------

    def open(self, request_id: str, on_lost: Callable[[], object]) -> MuxStream:
        """A new request's stream; its first frame, within ``ack_after``, is the lease's ACK."""
        old = self.streams.get(request_id)
        if old is not None:
            # The same request again (its lease ran out before its first frame went): the
            # old attempt's frames must never be mixed into the new one's.
            old.dead = True
            self._dirty.pop(old, None)
        stream = MuxStream(self, request_id, on_lost)
        self.streams[request_id] = stream
        if self.ack_after > 0:
            self._loop.call_later(self.ack_after, self._ack, stream)
        else:
            self.push(stream, framing.HEARTBEAT_FRAME)
        return stream

    def _ack(self, stream: MuxStream) -> None:
        """The grace is over and the stream sent nothing yet: an empty frame acknowledges it."""
        if not stream.last_sent and stream not in self._dirty and not stream.ended:
            self.push(stream, framing.HEARTBEAT_FRAME)

    def push(self, stream: MuxStream, frame: bytes) -> None:
        if stream.dead:
            return
        frames = self._dirty.get(stream)
        if frames is None:
            self._dirty[stream] = [frame]
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        else:
            frames.append(frame)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mux-upload")

    async def close(self, timeout: float = 10.0) -> None:
        """Send what is pending, end the upload cleanly and stop."""
        self._closing = True
        self._wake()
        task = self._task
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    def abort(self) -> None:
        """The session is gone: stop at once; every stream on the upload is lost."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
        self._lose(None)

    async def _run(self) -> None:
        backoff = Backoff()
        while not (self._closing and not self._dirty):
            self._lane += 1
            lane = self._lane
            self.uploads += 1
            self._carried = False
            try:
                await self._send(self._body(lane))
            except asyncio.CancelledError:
                self._lose(lane)
                raise
            except (BrokerUnavailable, BrokerRejected, LeaseLost, SessionLost) as exc:
                self._lose(lane, resend_unanswered=True)
                self._failures = 0 if self._carried else self._failures + 1
                log.warning("mux_upload_failed", error=str(exc), failures=self._failures)
                if isinstance(exc, SessionLost | LeaseLost) or self._failures >= GIVE_UP_AFTER:
                    # The runner registers again (session lost) or uses per-request
                    # uploads from now on (the path or the broker keeps refusing it).
                    self.usable = False
                    self._lose(None)
                    return
                await asyncio.sleep(backoff.next_delay(cap=5.0))
                continue
            # Ended with CLOSE and answered: every frame arrived; unfinished responses
            # continue on the next upload.
            self._failures = 0
            backoff.reset()
            for stream in self.streams.values():
                if stream.lane == lane:
                    stream.lane = 0

    def _lose(self, lane: int | None, resend_unanswered: bool = False) -> None:
        """Cancel the requests whose frames went into a failed upload (None: all of them);
        with ``resend_unanswered``, those that sent only heartbeats go on the next upload."""
        lost = [s for s in self.streams.values() if lane is None or s.lane == lane]
        if resend_unanswered:
            for stream in [s for s in lost if not s.answered]:
                stream.lane = 0
                if stream not in self._dirty:  # its acknowledgement, on the next upload
                    self._dirty[stream] = [framing.HEARTBEAT_FRAME]
            lost = [s for s in lost if s.answered]
        for stream in lost:
            del self.streams[stream.request_id]
            self._dirty.pop(stream, None)
            stream.dead = True
            stream.on_lost()
            if resend_unanswered:
                self._report_lost(stream.request_id)
        if lost:
            log.info("mux_requests_lost", requests=len(lost))

    def _report_lost(self, request_id: str) -> None:
        """An END ``connector_lost`` for a lost request, on the next upload."""
        note = MuxStream(self, request_id, lambda: None)
        note.ended = note.answered = True
        self.streams[request_id] = note
        self._dirty[note] = [framing.encode_end(LOST_END)]

    # -- the writer -----------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, timeout: float) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter
        handle = self._loop.call_later(max(0.0, timeout), _resolve, waiter)
        try:
            await waiter
        finally:
            handle.cancel()
            self._waiter = None

    async def _body(self, lane: int) -> AsyncIterator[bytes]:
        """One upload's body: pending frames as they come, heartbeats, then CLOSE."""
        loop = self._loop
        every = self.heartbeat / 2
        now = loop.time()
        last_out = now
        next_scan = now + every
        sent = 0
        while True:
            if not self._dirty and not self._closing:
                await self._wait(min(next_scan, last_out + self.heartbeat) - loop.time())
            now = loop.time()
            out = self._collect(lane, now, self.rotate_bytes - sent) if self._dirty else b""
            if now >= next_scan:
                out += self._heartbeats(lane, now)
                next_scan = now + every
            if not out and now - last_out >= self.heartbeat:
                out = framing.HEARTBEAT_FRAME
            if out:
                last_out = now
                sent += len(out)
                yield out
            if self._closing or sent >= self.rotate_bytes:
                yield framing.CLOSE_FRAME
                return

    def _collect(self, lane: int, now: float, budget: int = 1 << 62) -> bytes:
        """Every stream's pending frames, one MUX frame per stream (or per MAX_RUN bytes),
        about ``budget`` bytes of whole frames: the rest waits for the next write (or
        upload)."""
        dirty = self._dirty
        self._dirty = {}
        runs: list[bytes] = []
        streams = self.streams
        for stream, frames in dirty.items():
            if stream.lane != lane and stream.lane:
                # Still bound to an earlier upload: keep its frames for later.
                self._dirty.setdefault(stream, []).extend(frames)
                continue
            if budget <= 0:
                self._dirty[stream] = frames
                continue
            stream.lane = lane
            blob, rest = take_frames(frames, min(budget, FAIR_SHARE))
            if rest:
                self._dirty[stream] = rest
            if not stream.answered and not _only_heartbeats(blob):
                stream.answered = True
            budget -= len(blob)
            tag = stream.tag
            for start in range(0, len(blob), MAX_RUN):
                runs.append(framing.encode_mux(tag, blob[start : start + MAX_RUN]))
            stream.last_sent = now
            if self._trace is not None:
                self._traced(stream, frames)
            if stream.ended and stream not in self._dirty:
                streams.pop(stream.request_id, None)
                if self._trace is not None:
                    self._trace.done(stream.request_id)
        if runs:
            self._carried = True
        return runs[0] if len(runs) == 1 else b"".join(runs)

    def _traced(self, stream: MuxStream, frames: list[bytes]) -> None:
        """The hops of a request's frames handed to the upload (``--trace-hops``)."""
        assert self._trace is not None
        self._trace.mark(stream.request_id, "upload_ack")
        if any(frame[0] == framing.FrameType.DATA for frame in frames):
            self._trace.mark(stream.request_id, "upload_data")

    def _heartbeats(self, lane: int, now: float) -> bytes:
        """A heartbeat for each request on this upload that was silent for ``heartbeat``."""
        due = now - self.heartbeat
        return b"".join(
            framing.encode_mux(s.tag, framing.HEARTBEAT_FRAME)
            for s in self.streams.values()
            if s.lane == lane and s.last_sent <= due and not s.ended
        )


def take_frames(frames: list[bytes], share: int) -> tuple[bytes, list[bytes]]:
    """Whole frames from ``frames`` up to about ``share`` bytes, and the frames left over.

    A run never ends mid-frame, so an upload that ends (rotation) ends on a frame boundary
    and the next one, whichever broker receives it, starts with a whole frame. A DATA
    frame that does not fit is split into two DATA frames (the bytes are what counts); a
    HEAD or END frame is never split: it goes whole when it comes first (so every call
    makes progress), else it waits.
    """
    taken: list[bytes] = []
    room = share
    for i, frame in enumerate(frames):
        data = frame[0] == framing.FrameType.DATA
        if len(frame) <= room or (not taken and (not data or len(frame) <= _SMALLEST_CUT)):
            taken.append(frame)
            room -= len(frame)
            continue
        rest = frames[i:]
        if data and (room > framing.HEADER_SIZE or not taken):
            # At least one payload byte each side, so a tiny budget still makes progress.
            cut = max(1, room - framing.HEADER_SIZE)
            body = frame[framing.HEADER_SIZE :]
            taken.append(framing.encode_data(body[:cut]))
            rest[0] = framing.encode_data(body[cut:])
        return b"".join(taken), rest
    return b"".join(taken), []


_SMALLEST_CUT = framing.HEADER_SIZE + 1  # a DATA frame this small is never split


def _only_heartbeats(run: bytes) -> bool:
    """Whether a run of whole frames is heartbeats only (nothing of an answer)."""
    size = len(framing.HEARTBEAT_FRAME)
    return len(run) % size == 0 and run == framing.HEARTBEAT_FRAME * (len(run) // size)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
