"""The multiplexed upload's framing and demux (broker) and writer (connector), no sockets."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from broker.core import Failure, State, Timings
from broker.core.response import Event
from broker.relay.mux import MuxLane, MuxRegistry
from broker.state.channel import ResponseChannel
from broker.state.memory.relay import MemoryRelayState
from connector.errors import BrokerUnavailable
from connector.mux import MuxUploader, take_frames
from shared import framing
from shared.errors import FrameError
from shared.framing import Frame, FrameDecoder, FrameType, decode_end, encode_mux, split_mux
from shared.protocol import RequestItem, ResponseEnd, ResponseHead, UploadMode, UploadResult
from tests.support.registrations import registration

HEAD = ResponseHead(status=200, headers=[("content-type", "text/event-stream")])
END = ResponseEnd(ok=True)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- framing ------------------------------------------------------------------------------


@pytest.mark.parametrize("rid", ["r", "chatcmpl-" + "a" * 100, "x" * 255])
def test_mux_frame_round_trip(rid: str) -> None:
    inner = framing.encode_data(b"hello") + framing.HEARTBEAT_FRAME
    (frame,) = FrameDecoder().feed(encode_mux(rid.encode(), inner))
    assert frame.type is FrameType.MUX
    assert split_mux(frame.payload) == (rid, inner)


@pytest.mark.parametrize("payload", [b"", b"\x00abc", b"\x05ab", b"\x02\xff\xfe"])
def test_malformed_mux_frame(payload: bytes) -> None:
    with pytest.raises(FrameError, match="MUX"):
        split_mux(payload)


# -- the broker's demux -------------------------------------------------------------------


class Broker:
    """A hub with one mux session and requests leased to it."""

    def __init__(self, buffer_limit: int = 1 << 20, capacity: int = 8) -> None:
        self.clock = Clock()
        self.hub = MemoryRelayState(Timings(), clock=self.clock)
        session, _ = self.hub.core.register(
            registration(capacity=capacity, upload_mode=UploadMode.MUX), self.clock()
        )
        self.sid = session.id
        self.registry = MuxRegistry(self.hub, 1 << 24, buffer_limit)
        self.channels: dict[str, ResponseChannel] = {}

    async def lease(self, *rids: str) -> None:
        for rid in rids:
            item = RequestItem(request_id=rid, model="m", path="/v1/chat/completions", body="{}")
            _, self.channels[rid] = await self.hub.submit(item)
        taken = self.hub.core.take(self.sid, self.clock())
        assert sorted(i.request_id for i in taken) == sorted(rids)

    def lane(self) -> MuxLane:
        return self.registry.lane(self.sid)

    def state(self, rid: str) -> State | None:
        pending = self.hub.core.requests.get(rid)
        return pending.state if pending is not None else None

    def cancels(self) -> list[str]:
        return list(self.hub.core.sessions[self.sid].cancels)


def events(channel: ResponseChannel) -> list[Event]:
    """What the API handler would take next (``get`` without waiting)."""
    out = channel._events
    channel._events = []
    channel.buffered = 0
    return out


def response_frames(body: bytes) -> list[bytes]:
    frames = [framing.encode_head(HEAD)]
    frames += [framing.encode_data(body[i : i + 7]) for i in range(0, len(body), 7)]
    frames.append(framing.encode_end(END))
    return frames


async def test_interleaved_responses_cut_anywhere_arrive_whole_and_in_order() -> None:
    broker = Broker()
    rids = ["a", "b", "c"]
    await broker.lease(*rids)
    rng = random.Random(7)
    bodies = {rid: f"data: {rid * 300}\n\n".encode() for rid in rids}
    queues = {rid: response_frames(bodies[rid]) for rid in rids}
    wire = bytearray()
    while any(queues.values()):
        rid = rng.choice([r for r in rids if queues[r]])
        run = [queues[rid].pop(0) for _ in range(min(len(queues[rid]), rng.randint(1, 4)))]
        wire += encode_mux(rid.encode(), b"".join(run))
        if rng.random() < 0.2:
            wire += framing.HEARTBEAT_FRAME  # the upload's own heartbeat
    lane = broker.lane()
    pos = 0
    while pos < len(wire):
        n = rng.randint(1, 50)
        await lane.feed(bytes(wire[pos : pos + n]))
        pos += n
    for rid in rids:
        got = events(broker.channels[rid])
        assert got[0] == HEAD and got[-1] == END
        assert b"".join(e for e in got if isinstance(e, bytes)) == bodies[rid]
        assert broker.state(rid) is None  # the END frame finished it: its slot is free
    assert not broker.registry.appliers


async def test_first_frame_acknowledges_the_lease() -> None:
    broker = Broker()
    await broker.lease("r1")
    assert broker.state("r1") is State.LEASED
    await broker.lane().feed(encode_mux(b"r1", framing.HEARTBEAT_FRAME))
    assert broker.state("r1") is State.ACTIVE


async def test_frames_for_a_request_not_held_are_dropped_with_a_cancel_item() -> None:
    broker = Broker()
    lane = broker.lane()
    await lane.feed(encode_mux(b"stranger", framing.encode_data(b"x")))
    assert broker.cancels() == ["stranger"]
    # Later frames of it are dropped unseen: no second cancel, nothing applied.
    await lane.feed(encode_mux(b"stranger", framing.encode_data(b"y")))
    assert broker.cancels() == ["stranger"]
    assert not broker.registry.appliers


async def test_a_re_leased_request_is_refused() -> None:
    broker = Broker()
    await broker.lease("r1")
    broker.clock.now += 16  # past the lease: it goes back to the queue
    broker.hub.core.expire(broker.clock())
    assert broker.state("r1") is State.QUEUED
    broker.hub.core.sessions[broker.sid].cancels.clear()
    await broker.lane().feed(encode_mux(b"r1", framing.HEARTBEAT_FRAME))
    assert broker.state("r1") is State.QUEUED
    assert broker.cancels() == ["r1"]


async def test_a_slow_client_fails_alone_and_the_shared_reader_never_waits() -> None:
    broker = Broker(buffer_limit=64 * 1024)
    await broker.lease("slow", "fast")
    lane = broker.lane()
    chunk = framing.encode_data(b"z" * 16 * 1024)
    await lane.feed(encode_mux(b"slow", framing.encode_head(HEAD)))
    await lane.feed(encode_mux(b"fast", framing.encode_head(HEAD)))
    for _ in range(5):  # nobody takes "slow"'s bytes; "fast" is read after every write
        await lane.feed(encode_mux(b"slow", chunk) + encode_mux(b"fast", chunk))
        events(broker.channels["fast"])
    slow = events(broker.channels["slow"])
    failure = slow[-1]
    assert isinstance(failure, Failure) and failure.code == "client_too_slow"
    assert broker.state("slow") is None
    assert broker.cancels() == ["slow"]
    await lane.feed(encode_mux(b"fast", framing.encode_end(END)))
    assert events(broker.channels["fast"]) == [END]


async def test_a_bad_response_fails_only_its_request() -> None:
    broker = Broker()
    await broker.lease("bad", "good")
    lane = broker.lane()
    await lane.feed(encode_mux(b"bad", framing.encode(FrameType.HEAD, b"not json")))
    await lane.feed(encode_mux(b"good", framing.encode_head(HEAD) + framing.encode_end(END)))
    (failure,) = events(broker.channels["bad"])
    assert isinstance(failure, Failure) and failure.code == "bad_upload"
    assert events(broker.channels["good"]) == [HEAD, END]


@pytest.mark.parametrize(
    "frame",
    [framing.encode_data(b"x"), framing.encode_head(HEAD), framing.encode_end(END)],
)
async def test_response_frames_outside_a_mux_frame_break_the_upload(frame: bytes) -> None:
    with pytest.raises(FrameError, match="outside a MUX frame"):
        await Broker().lane().feed(frame)


async def test_a_mux_frame_inside_a_response_is_refused() -> None:
    broker = Broker()
    await broker.lease("r1")
    await broker.lane().feed(encode_mux(b"r1", encode_mux(b"r1", b"")))
    (failure,) = events(broker.channels["r1"])
    assert isinstance(failure, Failure) and failure.code == "bad_upload"


async def test_a_cut_upload_fails_what_it_carried() -> None:
    broker = Broker()
    await broker.lease("started", "waiting")
    lane = broker.lane()
    await lane.feed(encode_mux(b"started", framing.encode_head(HEAD) + framing.encode_data(b"x")))
    await lane.end(clean=False)
    got = events(broker.channels["started"])
    assert got[:2] == [HEAD, b"x"]
    assert isinstance(got[2], Failure) and got[2].code == "connector_lost"
    assert broker.state("started") is None
    # A request that had sent nothing is untouched: its lease still covers it.
    assert broker.state("waiting") is State.LEASED


async def test_after_a_clean_close_a_response_continues_on_the_next_upload() -> None:
    broker = Broker()
    await broker.lease("r1")
    first = broker.lane()
    await first.feed(encode_mux(b"r1", framing.encode_head(HEAD) + framing.encode_data(b"a")))
    await first.feed(framing.CLOSE_FRAME)
    assert first.closed
    await first.end(clean=True)
    assert broker.state("r1") is State.ACTIVE
    second = broker.lane()
    await second.feed(encode_mux(b"r1", framing.encode_data(b"b") + framing.encode_end(END)))
    assert events(broker.channels["r1"]) == [HEAD, b"a", b"b", END]


def handing_over(broker: Broker) -> list[str]:
    """Make the broker's state let go of a request at a clean close, as the Redis one does."""
    handed: list[str] = []

    def hand_over(rid: str) -> bool:
        handed.append(rid)
        return True

    broker.hub.hand_over = hand_over  # type: ignore[method-assign]
    return handed


async def test_a_handed_over_request_is_let_go_and_acknowledged_again_by_the_next_lane() -> None:
    broker = Broker()
    handed = handing_over(broker)
    await broker.lease("r1")
    first = broker.lane()
    await first.feed(encode_mux(b"r1", framing.encode_head(HEAD) + framing.encode_data(b"a")))
    await first.feed(framing.CLOSE_FRAME)
    await first.end(clean=True)
    assert handed == ["r1"]
    assert not broker.registry.appliers and not broker.registry.dropped  # let go, not dropped
    second = broker.lane()  # here or on another broker: its first frame acknowledges again
    await second.feed(encode_mux(b"r1", framing.encode_data(b"b") + framing.encode_end(END)))
    assert events(broker.channels["r1"]) == [HEAD, b"a", b"b", END]


async def test_a_request_cut_mid_frame_by_an_older_connector_stays_held_here() -> None:
    broker = Broker()
    handed = handing_over(broker)
    await broker.lease("r1")
    data = framing.encode_data(b"abc")
    first = broker.lane()
    await first.feed(encode_mux(b"r1", framing.encode_head(HEAD) + data[:6]))
    await first.feed(framing.CLOSE_FRAME)
    await first.end(clean=True)
    assert handed == [] and broker.registry.owners == {"r1": None}
    await broker.lane().feed(encode_mux(b"r1", data[6:] + framing.encode_end(END)))
    assert events(broker.channels["r1"]) == [HEAD, b"abc", END]


async def test_one_response_on_two_open_uploads_is_refused() -> None:
    broker = Broker()
    await broker.lease("r1")
    await broker.lane().feed(encode_mux(b"r1", framing.encode_head(HEAD)))
    await broker.lane().feed(encode_mux(b"r1", framing.encode_data(b"b")))
    got = events(broker.channels["r1"])
    assert got[0] == HEAD and isinstance(got[1], Failure) and got[1].code == "bad_upload"


async def test_a_cancelled_request_is_dropped_on_its_next_frame() -> None:
    broker = Broker()
    await broker.lease("r1")
    lane = broker.lane()
    await lane.feed(encode_mux(b"r1", framing.encode_head(HEAD)))
    await broker.hub.cancel("r1")  # the API user left
    await broker.hub.finish("r1")
    await lane.feed(encode_mux(b"r1", framing.encode_data(b"late")))
    assert not broker.registry.appliers
    assert broker.cancels() == ["r1"]  # the one cancel the API side already sent


# -- the connector's writer ---------------------------------------------------------------


class FakeBroker:
    """Reads each upload body as the broker would; ``fail`` makes the next uploads fail."""

    def __init__(self) -> None:
        self.uploads: list[list[Frame]] = []
        self.fail_after: int | None = None  # fail an upload after this many body writes
        self.opened = asyncio.Event()

    async def send(self, body: AsyncIterator[bytes]) -> UploadResult:
        frames: list[Frame] = []
        self.uploads.append(frames)
        self.opened.set()
        decoder = FrameDecoder()
        writes = 0
        async for chunk in body:
            frames += decoder.feed(chunk)
            writes += 1
            if self.fail_after is not None and writes >= self.fail_after:
                await body.aclose()  # type: ignore[attr-defined]
                raise BrokerUnavailable("ReadError: cut")
        return UploadResult(status="ok")


def runs(frames: list[Frame]) -> list[tuple[str, list[FrameType]]]:
    out = []
    for frame in frames:
        if frame.type is FrameType.MUX:
            rid, inner = split_mux(frame.payload)
            out.append((rid, [f.type for f in FrameDecoder().feed(inner)]))
    return out


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_writer_tags_each_request_and_coalesces_a_tick_into_one_write() -> None:
    fake = FakeBroker()
    mux = MuxUploader(fake.send, heartbeat=15.0, ack_after=0)
    mux.start()
    lost: list[str] = []
    a = mux.open("a", lambda: lost.append("a"))
    b = mux.open("b", lambda: lost.append("b"))
    await _settle()
    a.head(HEAD)
    a.data(b"1")
    b.head(HEAD)
    a.data(b"2")
    b.end(END)
    await _settle()
    a.end(END)
    await mux.close()
    (upload,) = fake.uploads
    assert runs(upload) == [
        ("a", [FrameType.HEARTBEAT]),  # the hello that acknowledges the lease
        ("b", [FrameType.HEARTBEAT]),
        ("a", [FrameType.HEAD, FrameType.DATA, FrameType.DATA]),
        ("b", [FrameType.HEAD, FrameType.END]),
        ("a", [FrameType.END]),
    ]
    assert upload[-1].type is FrameType.CLOSE
    assert not mux.streams and not lost


async def test_the_ack_travels_with_a_head_that_comes_within_the_grace() -> None:
    """No write of its own for the ACK when the upstream answers quickly: the head is the
    request's first frame (the ACK written first delayed the upstream call, at one stream)."""
    fake = FakeBroker()
    mux = MuxUploader(fake.send, heartbeat=15.0, ack_after=5.0)
    mux.start()
    s = mux.open("r", lambda: None)
    await _settle()
    s.head(HEAD)
    s.data(b"1")
    s.end(END)
    await mux.close()
    (upload,) = fake.uploads
    assert runs(upload) == [("r", [FrameType.HEAD, FrameType.DATA, FrameType.END])]


async def test_a_request_silent_for_the_grace_is_acknowledged_alone() -> None:
    fake = FakeBroker()
    mux = MuxUploader(fake.send, heartbeat=15.0, ack_after=0.01)
    mux.start()
    s = mux.open("slow", lambda: None)
    for _ in range(500):
        if fake.uploads and runs(fake.uploads[0]):
            break
        await asyncio.sleep(0.01)
    assert runs(fake.uploads[0]) == [("slow", [FrameType.HEARTBEAT])]
    s.head(HEAD)
    s.end(END)
    await mux.close()
    assert runs(fake.uploads[0])[1:] == [("slow", [FrameType.HEAD, FrameType.END])]


async def test_writer_rotates_after_rotate_bytes_and_keeps_the_order() -> None:
    fake = FakeBroker()
    mux = MuxUploader(fake.send, heartbeat=15.0, ack_after=0, rotate_bytes=1000)
    mux.start()
    s = mux.open("r", lambda: None)
    s.head(HEAD)
    for i in range(10):
        s.data(bytes([65 + i]) * 400)
        await _settle()
    s.end(END)
    await mux.close()
    assert len(fake.uploads) >= 3
    wire = b""
    for upload in fake.uploads:
        assert upload[-1].type is FrameType.CLOSE
        for frame in upload:
            if frame.type is FrameType.MUX:
                wire += split_mux(frame.payload)[1]
    frames = FrameDecoder().feed(wire)
    data = b"".join(f.payload for f in frames if f.type is FrameType.DATA)
    assert data == b"".join(bytes([65 + i]) * 400 for i in range(10))
    assert frames[-1].type is FrameType.END


async def test_a_failed_upload_loses_only_the_requests_it_carried() -> None:
    fake = FakeBroker()
    fake.fail_after = 2
    mux = MuxUploader(fake.send, heartbeat=15.0, ack_after=0)
    lost: list[str] = []
    carried = mux.open("carried", lambda: lost.append("carried"))
    mux.start()
    await _settle()  # write 1: carried's hello
    carried.data(b"x")  # write 2: the upload fails after it
    await _settle()
    fake.fail_after = None
    later = mux.open("later", lambda: lost.append("later"))
    await fake.opened.wait()
    for _ in range(200):
        if len(fake.uploads) == 2:
            break
        await asyncio.sleep(0.01)  # the reconnect waits a jittered backoff (at most 0.5 s)
    later.end(END)
    await mux.close()
    assert lost == ["carried"]
    sent = [kind for rid, kinds in runs(fake.uploads[1]) for kind in kinds if rid == "later"]
    assert sent == [FrameType.HEARTBEAT, FrameType.END]
    # The lost one's broker is told at once on the next upload: its answer was cut.
    assert ("carried", [FrameType.END]) in runs(fake.uploads[1])
    assert lost_end(fake.uploads[1], "carried").error_type == "connector_lost"


def lost_end(frames: list[Frame], request_id: str) -> ResponseEnd:
    for frame in frames:
        if frame.type is FrameType.MUX:
            rid, inner = split_mux(frame.payload)
            if rid == request_id:
                (end,) = FrameDecoder().feed(inner)
                return decode_end(end.payload)
    raise AssertionError(f"no END for {request_id}")


async def test_heartbeats_go_to_silent_requests_only() -> None:
    mux = MuxUploader(FakeBroker().send, heartbeat=15.0, ack_after=0)
    quiet = mux.open("quiet", lambda: None)
    busy = mux.open("busy", lambda: None)
    mux._collect(1, now=100.0)
    busy.data(b"x")
    mux._collect(1, now=110.0)
    beats = FrameDecoder().feed(mux._heartbeats(1, now=116.0))
    assert [split_mux(f.payload)[0] for f in beats] == ["quiet"]
    assert quiet.last_sent == 100.0


async def test_a_second_attempt_of_a_request_never_carries_the_first_ones_frames() -> None:
    mux = MuxUploader(FakeBroker().send, heartbeat=15.0, ack_after=0)
    first = mux.open("r", lambda: None)
    first.data(b"old")
    second = mux.open("r", lambda: None)
    first.data(b"older")  # the old attempt's task has not seen its cancel yet
    first.close()
    second.head(HEAD)
    (frame,) = FrameDecoder().feed(mux._collect(1, now=1.0))
    rid, inner = split_mux(frame.payload)
    assert rid == "r"
    assert [f.type for f in FrameDecoder().feed(inner)] == [FrameType.HEARTBEAT, FrameType.HEAD]


async def test_no_upload_grows_past_rotate_bytes_even_for_one_big_write() -> None:
    fake = FakeBroker()
    mux = MuxUploader(fake.send, heartbeat=15.0, ack_after=0, rotate_bytes=1000)
    s = mux.open("r", lambda: None)
    blob = bytes(range(256)) * 20  # 5,120 bytes pushed in one go
    s.data(blob)
    s.end(END)
    mux.start()
    await mux.close()
    assert len(fake.uploads) >= 5
    data = b""
    kinds: list[FrameType] = []
    for upload in fake.uploads:
        size = sum(5 + len(f.payload) for f in upload)
        assert size < 1100
        # Each upload decodes on its own (another broker may receive it): the big DATA
        # frame was split into whole DATA frames, never cut mid-frame.
        decoder = FrameDecoder()
        for frame in upload:
            if frame.type is FrameType.MUX:
                for inner in decoder.feed(split_mux(frame.payload)[1]):
                    kinds.append(inner.type)
                    data += inner.payload if inner.type is FrameType.DATA else b""
        assert decoder.pending == 0
    assert kinds[0] is FrameType.HEARTBEAT and kinds[-1] is FrameType.END
    assert set(kinds[1:-1]) == {FrameType.DATA}
    assert data == blob


@pytest.mark.parametrize("share", [1, 3, 5, 6, 17, 100, 10_000])
def test_take_frames_ends_on_a_frame_boundary_and_loses_nothing(share: int) -> None:
    frames = [framing.encode_head(HEAD), framing.encode_data(b"x" * 50), framing.encode_end(END)]
    runs: list[bytes] = []
    rest = frames
    while rest:
        taken, rest = take_frames(rest, share)
        assert taken  # always progress
        runs.append(taken)
    decoded = []
    for run in runs:
        decoder = FrameDecoder()
        decoded += decoder.feed(run)
        assert decoder.pending == 0  # every run is whole frames
    assert decoded[0] == Frame(FrameType.HEAD, frames[0][5:])
    assert b"".join(f.payload for f in decoded if f.type is FrameType.DATA) == b"x" * 50
    assert decoded[-1].type is FrameType.END


async def test_a_flooding_response_takes_turns_with_the_others() -> None:
    mux = MuxUploader(FakeBroker().send, heartbeat=15.0, ack_after=0)
    flood = mux.open("flood", lambda: None)
    quiet = mux.open("quiet", lambda: None)
    mux._collect(1, now=1.0)  # the hellos
    flood.data(b"x" * 300_000)
    quiet.data(b"q")
    writes = []
    while mux._dirty:
        frames = FrameDecoder().feed(mux._collect(1, now=2.0))
        writes.append([(split_mux(f.payload)[0], len(f.payload)) for f in frames])
    # The quiet response goes out in the first write, not after 300 kB of the other one.
    assert [rid for rid, _ in writes[0]] == ["flood", "quiet"]
    assert all(size <= 64 * 1024 + 16 for write in writes for _, size in write)
    assert len(writes) == 5


async def test_a_request_that_sent_only_its_acknowledgement_goes_on_the_next_upload() -> None:
    # Found by the failover soak: the broker carrying the upload was killed right after a
    # request's lease was acknowledged through it; the request was lost and its user waited
    # a whole lease for the redispatch. Nothing of its answer was sent: it goes on.
    fake = FakeBroker()
    fake.fail_after = 2
    mux = MuxUploader(fake.send, heartbeat=15.0, ack_after=0)  # the ACK goes out at once
    lost: list[str] = []
    acked = mux.open("acked", lambda: lost.append("acked"))
    answering = mux.open("answering", lambda: lost.append("answering"))
    mux.start()
    await _settle()  # write 1: both hellos
    answering.data(b"x")  # write 2: the upload fails after it
    await _settle()
    fake.fail_after = None
    await fake.opened.wait()
    for _ in range(200):
        if len(fake.uploads) == 2:
            break
        await asyncio.sleep(0.01)  # the reconnect waits a jittered backoff (at most 0.5 s)
    acked.head(HEAD)
    acked.end(END)
    await mux.close()
    assert lost == ["answering"]  # part of its answer went into the failed upload
    sent = [kind for rid, kinds in runs(fake.uploads[1]) for kind in kinds if rid == "acked"]
    assert sent == [FrameType.HEARTBEAT, FrameType.HEAD, FrameType.END]
    assert lost_end(fake.uploads[1], "answering").error_type == "connector_lost"
