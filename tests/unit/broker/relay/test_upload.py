from __future__ import annotations

import random

import pytest

from broker.core import Failure, Pending, Timings
from broker.core.response import Event
from broker.relay.upload import FrameApplier, PartAssembler, UploadTooLarge
from broker.state.channel import ResponseChannel
from broker.state.memory.relay import MemoryRelayState
from shared.errors import FrameError
from shared.framing import HEARTBEAT_FRAME, encode_data, encode_end, encode_head
from shared.protocol import RequestItem, ResponseEnd, ResponseHead, UploadMode
from tests.support.registrations import registration

HEAD = ResponseHead(status=200, headers=[("content-type", "text/event-stream")])
END = ResponseEnd(ok=True, upstream_ms=7.0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def _setup(
    limit: int = 1 << 20,
) -> tuple[MemoryRelayState, Pending, ResponseChannel, FrameApplier, Clock]:
    clock = Clock()
    hub = MemoryRelayState(Timings(), clock=clock)
    session, _ = await hub.register(registration(upload_mode=UploadMode.PARTS))
    item = RequestItem(request_id="r1", model="m", path="/v1/chat/completions", body="{}")
    pending, channel = await hub.submit(item)
    assert [i.request_id for i in hub.core.take(session.id, clock())] == ["r1"]
    await hub.ack(session.id, "r1")
    applier = FrameApplier(hub, clock, pending, channel, limit)
    return hub, pending, channel, applier, clock


def _body(seed: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(
        f'data: {{"n": {i}, "t": "{rng.random()}"}}\n\n'.encode() for i in range(200)
    ) + bytes(rng.randrange(256) for _ in range(3000))


def _upload(body: bytes, seed: int) -> bytes:
    """Head, body in random data frames with heartbeats, end."""
    rng = random.Random(seed)
    out = [encode_head(HEAD)]
    pos = 0
    while pos < len(body):
        n = rng.randint(1, 900)
        out.append(encode_data(body[pos : pos + n]))
        if rng.random() < 0.1:
            out.append(HEARTBEAT_FRAME)
        pos += n
    out.append(encode_end(END))
    return b"".join(out)


def _split(wire: bytes, seed: int) -> list[bytes]:
    """Parts cut anywhere, frames included: parts never depend on frame boundaries."""
    rng = random.Random(seed)
    parts = []
    pos = 0
    while pos < len(wire):
        n = rng.randint(1, 2000)
        parts.append(wire[pos : pos + n])
        pos += n
    return parts


async def _drain(channel: ResponseChannel) -> list[Event]:
    events: list[Event] = []
    while batch := await channel.get(timeout=0.001):
        events += batch
    return events


def _check_exact(events: list[Event], body: bytes) -> None:
    assert events[0] == HEAD
    assert events[-1] == END
    middle = events[1:-1]
    assert all(isinstance(e, bytes) for e in middle)
    assert b"".join(e for e in middle if isinstance(e, bytes)) == body


async def test_stream_fed_in_random_chunks_reaches_channel_exactly() -> None:
    _, pending, channel, applier, _ = await _setup()
    body = _body(1)
    for chunk in _split(_upload(body, 2), 3):
        applier.feed(chunk)
    assert applier.done
    assert pending.head_seen
    assert applier.received == len(body)
    _check_exact(await _drain(channel), body)


@pytest.mark.parametrize("seed", range(8))
async def test_parts_out_of_order_with_repeats_applied_once_in_order(seed: int) -> None:
    _, _, channel, applier, _ = await _setup()
    body = _body(seed)
    parts = _split(_upload(body, seed), seed + 100)
    rng = random.Random(seed)
    deliveries = [*range(len(parts)), *rng.choices(range(len(parts)), k=len(parts) // 2)]
    rng.shuffle(deliveries)
    # Keep the held set bounded the way a real connector does: it never runs far ahead.
    assembler = PartAssembler(applier, max_held=len(parts))
    seen: set[int] = set()
    for seq in deliveries:
        fresh = await assembler.add(seq, parts[seq])
        assert fresh == (seq not in seen), seq
        seen.add(seq)
    assert assembler.next_seq == len(parts)
    assert assembler.held == {}
    assert applier.done
    _check_exact(await _drain(channel), body)


async def test_repeat_of_applied_part_is_not_reapplied() -> None:
    _, _, channel, applier, _ = await _setup()
    assembler = PartAssembler(applier)
    first = encode_head(HEAD) + encode_data(b"abc")
    assert await assembler.add(0, first)
    assert not await assembler.add(0, first)
    assert await assembler.add(1, encode_data(b"def"))
    assert not await assembler.add(1, encode_data(b"def"))
    assert not await assembler.add(0, first)
    assert await assembler.add(2, encode_end(END))
    assert await _drain(channel) == [HEAD, b"abc", b"def", END]


async def test_held_part_repeated_before_gap_fills() -> None:
    _, _, channel, applier, _ = await _setup()
    assembler = PartAssembler(applier)
    assert await assembler.add(2, encode_data(b"C"))
    assert not await assembler.add(2, encode_data(b"C"))
    assert await assembler.add(1, encode_data(b"B"))
    assert await channel.get(timeout=0.001) == []  # nothing before part 0
    assert await assembler.add(0, encode_head(HEAD) + encode_data(b"A"))
    assert await _drain(channel) == [HEAD, b"A", b"B", b"C"]
    assert assembler.next_seq == 3


@pytest.mark.parametrize("max_held", [1, 3, 8])
async def test_too_many_held_parts(max_held: int) -> None:
    _, _, _, applier, _ = await _setup()
    assembler = PartAssembler(applier, max_held=max_held)
    for seq in range(1, max_held + 1):
        assert await assembler.add(seq, encode_data(b"x"))
    assert not await assembler.add(1, encode_data(b"x"))  # a repeat is not "one more"
    with pytest.raises(FrameError):
        await assembler.add(max_held + 1, encode_data(b"x"))


@pytest.mark.parametrize(("sizes", "limit", "ok"), [([5, 5], 10, True), ([5, 6], 10, False)])
async def test_response_limit(sizes: list[int], limit: int, ok: bool) -> None:
    _, _, channel, applier, _ = await _setup(limit=limit)
    wire = encode_head(HEAD) + b"".join(encode_data(b"a" * n) for n in sizes)
    if ok:
        applier.feed(wire)
        assert applier.received == limit
    else:
        with pytest.raises(UploadTooLarge):
            applier.feed(wire)
        events = await _drain(channel)
        assert sum(len(e) for e in events if isinstance(e, bytes)) <= limit


async def test_limit_counts_across_parts() -> None:
    _, _, _, applier, _ = await _setup(limit=1000)
    assembler = PartAssembler(applier)
    await assembler.add(0, encode_head(HEAD) + encode_data(b"a" * 600))
    with pytest.raises(UploadTooLarge):
        await assembler.add(1, encode_data(b"a" * 401))


async def test_feed_records_activity_and_head() -> None:
    _, pending, _, applier, clock = await _setup()
    assert not pending.head_seen
    clock.now = 150.0
    applier.feed(HEARTBEAT_FRAME)
    assert pending.last_activity == 150.0
    assert not pending.head_seen
    clock.now = 160.0
    applier.feed(encode_head(HEAD)[:3])  # even a partial frame is a sign of life
    assert pending.last_activity == 160.0
    assert not pending.head_seen
    applier.feed(encode_head(HEAD)[3:])
    assert pending.head_seen


async def test_bytes_after_end_are_ignored() -> None:
    _, _, channel, applier, _ = await _setup()
    applier.feed(encode_head(HEAD) + encode_end(END) + encode_data(b"junk"))
    applier.feed(encode_data(b"more junk"))
    applier.feed(b"\xff\xff not even a frame")
    assert await _drain(channel) == [HEAD, END]


async def test_malformed_upload_raises_frame_error() -> None:
    _, _, _, applier, _ = await _setup()
    with pytest.raises(FrameError):
        applier.feed(bytes([9, 0, 0, 0, 0]))


async def test_abort_fails_channel_once() -> None:
    _, _, channel, applier, _ = await _setup()
    applier.feed(encode_head(HEAD))
    await applier.abort(502, "bad_upload", "broken frames")
    await applier.abort(500, "again", "ignored")
    assert await _drain(channel) == [HEAD, Failure(502, "bad_upload", "broken frames")]


async def test_abort_after_end_changes_nothing() -> None:
    _, _, channel, applier, _ = await _setup()
    applier.feed(encode_head(HEAD) + encode_end(END))
    await applier.abort(502, "x", "y")
    assert await _drain(channel) == [HEAD, END]


async def test_cancelled_reflects_core_state() -> None:
    hub, _, _, applier, _ = await _setup()
    assert not applier.cancelled
    await hub.cancel("r1")
    assert applier.cancelled
