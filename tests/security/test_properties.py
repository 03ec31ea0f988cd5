"""Properties of what parses connector input: random and truncated bytes never raise
anything but the documented error, and never make the parser hold more than its bounds.

The frame decoder and MUX split (``shared.framing``: ``FrameError``), the parts assembler
(``broker.relay.upload``: ``FrameError`` or ``UploadTooLarge``), the mux lane (``broker.relay.mux``:
``FrameError`` ends the upload) and the protocol models (``shared.protocol``:
``ValidationError``). Bounded example counts keep the module well under 30 s.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from broker.core import Timings
from broker.core.relay import MAX_REFUSALS
from broker.relay.mux import DROPPED_REMEMBERED, MuxRegistry
from broker.relay.upload import FrameApplier, PartAssembler, UploadTooLarge
from broker.state.channel import ResponseChannel
from broker.state.memory.relay import MemoryRelayState
from shared import framing, protocol
from shared.errors import FrameError
from shared.framing import HEADER_SIZE, FrameDecoder, FrameType
from shared.protocol import RequestItem, ResponseEnd, ResponseHead, UploadMode
from tests.support.registrations import registration

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_FRAME = 4096
LEASED = ["r0", "r1", "r2"]
RIDS = st.sampled_from([*LEASED, "ghost", "x" * 255])


def _frames() -> st.SearchStrategy[bytes]:
    """Well-formed inner frames (HEAD, DATA, HEARTBEAT, END) or arbitrary bytes."""
    head = framing.encode_head(ResponseHead(status=200, headers=[("a", "b")]))
    end = framing.encode_end(ResponseEnd())
    data = st.binary(max_size=300).map(framing.encode_data)
    one = st.one_of(st.just(head), st.just(end), st.just(framing.HEARTBEAT_FRAME), data)
    return st.lists(one, max_size=6).map(b"".join) | st.binary(max_size=200)


def _cuts(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` split at the given points (as a proxy may re-chunk a body)."""
    marks = sorted({p % (len(data) + 1) for p in points})
    edges = [0, *marks, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


# -- the frame decoder --------------------------------------------------------------------


@FAST
@given(st.binary(max_size=3 * MAX_FRAME), st.lists(st.integers(0, 1 << 16), max_size=8))
def test_decoder_takes_any_bytes_and_holds_at_most_one_frame(
    data: bytes, points: list[int]
) -> None:
    decoder = FrameDecoder(max_frame=MAX_FRAME)
    try:
        for piece in _cuts(data, points):
            for frame in decoder.feed(piece):
                assert isinstance(frame.type, FrameType) and len(frame.payload) <= MAX_FRAME
            assert decoder.pending < HEADER_SIZE + MAX_FRAME
    except FrameError:
        pass


@FAST
@given(
    st.lists(st.tuples(st.sampled_from(list(FrameType)), st.binary(max_size=500)), max_size=10),
    st.lists(st.integers(0, 1 << 16), max_size=10),
    st.integers(0, 50),
)
def test_decoder_round_trip_and_truncation(
    frames: list[tuple[FrameType, bytes]], points: list[int], cut: int
) -> None:
    data = b"".join(framing.encode(kind, payload) for kind, payload in frames)
    decoder = FrameDecoder(max_frame=MAX_FRAME)
    got = [f for piece in _cuts(data, points) for f in decoder.feed(piece)]
    assert [(f.type, f.payload) for f in got] == frames and decoder.pending == 0
    # Truncated: whole frames come out, the rest waits; nothing else happens.
    truncated = FrameDecoder(max_frame=MAX_FRAME)
    whole = truncated.feed(data[: max(0, len(data) - cut)])
    assert [(f.type, f.payload) for f in whole] == frames[: len(whole)]


@FAST
@given(st.binary(max_size=400))
def test_split_mux_and_head_end_decoders_raise_only_frame_error(payload: bytes) -> None:
    for parse in (framing.split_mux, framing.decode_head, framing.decode_end):
        try:
            parse(payload)
        except FrameError:
            pass


# -- the parts assembler ------------------------------------------------------------------


async def _leased(upload_mode: UploadMode, rids: list[str]) -> tuple[MemoryRelayState, str]:
    hub = MemoryRelayState(Timings(), clock=lambda: 100.0)
    session, _ = hub.core.register(
        registration("c", capacity=len(rids), upload_mode=upload_mode), now=100.0
    )
    for rid in rids:
        item = RequestItem(request_id=rid, model="m", path="/v1/chat/completions", body="{}")
        await hub.submit(item)
    assert len(hub.core.take(session.id, 100.0)) == len(rids)
    return hub, session.id


async def _assemble(parts: list[tuple[int, bytes]], max_bytes: int) -> None:
    hub, sid = await _leased(UploadMode.PARTS, ["r0"])
    pending, channel = await hub.ack(sid, "r0")
    applier = FrameApplier(hub, hub.clock, pending, channel, 1 << 16)
    assembler = PartAssembler(applier, max_held=16, max_bytes=max_bytes)
    try:
        for seq, data in parts:
            await assembler.add(seq, data)
            assert len(assembler.held) <= 16 and assembler.held_bytes <= max_bytes
            assert assembler.held_bytes == sum(map(len, assembler.held.values()))
    except (FrameError, UploadTooLarge):
        pass


@FAST
@given(
    st.lists(st.tuples(st.integers(0, 40), _frames()), max_size=30),
    st.integers(1, 2000),
)
def test_parts_assembler_takes_any_parts_within_its_bounds(
    parts: list[tuple[int, bytes]], max_bytes: int
) -> None:
    asyncio.run(_assemble(parts, max_bytes))


async def _reassemble(body: bytes, order: list[int]) -> bytes:
    hub, sid = await _leased(UploadMode.PARTS, ["r0"])
    pending, channel = await hub.ack(sid, "r0")
    assert isinstance(channel, ResponseChannel)
    applier = FrameApplier(hub, hub.clock, pending, channel, 1 << 16)
    assembler = PartAssembler(applier, max_bytes=1 << 16)
    pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
    for seq in order:
        await assembler.add(seq % len(pieces), pieces[seq % len(pieces)])
    for seq, piece in enumerate(pieces):  # every part at least once
        await assembler.add(seq, piece)
    return b"".join(e for e in channel._events if isinstance(e, bytes))


@FAST
@given(st.binary(min_size=1, max_size=500), st.lists(st.integers(0, 1000), max_size=100))
def test_parts_in_any_order_and_repeated_apply_once_in_order(data: bytes, order: list[int]) -> None:
    body = framing.encode_data(data) + framing.encode_end(ResponseEnd())
    assert asyncio.run(_reassemble(body, order)) == data


# -- the mux lane -------------------------------------------------------------------------


async def _mux(chunks: list[bytes]) -> None:
    hub, sid = await _leased(UploadMode.MUX, LEASED)
    registry = MuxRegistry(hub, 1 << 16, 1 << 16)
    lane = registry.lane(sid)
    try:
        for chunk in chunks:
            await lane.feed(chunk)
            assert set(registry.appliers) <= set(LEASED)
            assert len(registry.dropped) <= DROPPED_REMEMBERED
            assert len(hub.core.sessions[sid].cancels) <= MAX_REFUSALS
            assert lane.decoder.pending < HEADER_SIZE + framing.DEFAULT_MAX_FRAME
    except FrameError:
        pass
    finally:
        await lane.end(clean=False)
    assert not lane.owned


def _mux_pieces() -> st.SearchStrategy[bytes]:
    mux = st.tuples(RIDS, _frames()).map(lambda t: framing.encode_mux(t[0].encode(), t[1]))
    other = st.sampled_from([framing.HEARTBEAT_FRAME, framing.CLOSE_FRAME])
    return st.one_of(mux, mux, other, st.binary(max_size=40))


@FAST
@given(st.lists(_mux_pieces(), max_size=12), st.lists(st.integers(0, 1 << 16), max_size=8))
def test_mux_lane_takes_any_upload_within_its_bounds(
    pieces: list[bytes], points: list[int]
) -> None:
    asyncio.run(_mux(_cuts(b"".join(pieces), points)))


# -- the protocol models ------------------------------------------------------------------

MODELS = [
    cls
    for _, cls in inspect.getmembers(protocol, inspect.isclass)
    if issubclass(cls, BaseModel) and cls.__module__ == protocol.__name__ and cls.__name__[0] != "_"
]
JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)


def _fields(cls: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the model's own field names, holding any JSON."""
    return st.dictionaries(st.sampled_from(sorted(cls.model_fields)), JSON, max_size=8)


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_protocol_models_raise_only_validation_error(cls: type[BaseModel], data: Any) -> None:
    raw = data.draw(
        st.one_of(
            st.binary(max_size=100),
            JSON.map(lambda v: json.dumps(v).encode()),
            _fields(cls).map(lambda v: json.dumps(v).encode()),
        )
    )
    cut = data.draw(st.integers(0, len(raw)))
    for text in (raw, raw[:cut]):
        try:
            cls.model_validate_json(text)
        except ValidationError:
            pass
