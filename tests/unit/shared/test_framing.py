from __future__ import annotations

import random

import pytest

from shared import framing
from shared.errors import FrameError
from shared.framing import (
    HEADER_SIZE,
    HEARTBEAT_FRAME,
    Frame,
    FrameDecoder,
    FrameType,
    decode_end,
    decode_head,
    encode,
    encode_data,
    encode_end,
    encode_head,
)
from shared.protocol import ResponseEnd, ResponseHead

HEAD = ResponseHead(
    status=200,
    headers=[("content-type", "text/event-stream"), ("x-ünïcode", "välue")],
    upstream_ms=12.5,
)
END_OK = ResponseEnd(ok=True, upstream_ms=3.0)
END_ERR = ResponseEnd(ok=False, error="upstream reset", error_type="upstream_error", status=502)

SSE = b'data: {"choices":[{"delta":{"content":"h\xc3\xa9"}}]}\n\n' * 3 + b"data: [DONE]\n\n"


def _stream() -> tuple[bytes, list[Frame]]:
    """A realistic upload: head, data (incl. empty and binary), heartbeat, end."""
    chunks = [SSE, b"", bytes(range(256)), b"x" * 70_000]
    wire = [encode_head(HEAD)]
    frames = [Frame(FrameType.HEAD, HEAD.model_dump_json().encode())]
    for chunk in chunks:
        wire.append(encode_data(chunk))
        frames.append(Frame(FrameType.DATA, chunk))
    wire.append(HEARTBEAT_FRAME)
    frames.append(Frame(FrameType.HEARTBEAT, b""))
    wire.append(encode_end(END_ERR))
    frames.append(Frame(FrameType.END, END_ERR.model_dump_json().encode()))
    return b"".join(wire), frames


@pytest.mark.parametrize(
    ("frame_type", "payload"),
    [
        (FrameType.HEAD, HEAD.model_dump_json().encode()),
        (FrameType.DATA, b""),
        (FrameType.DATA, SSE),
        (FrameType.DATA, bytes(range(256)) * 10),
        (FrameType.HEARTBEAT, b""),
        (FrameType.END, END_OK.model_dump_json().encode()),
    ],
)
def test_encode_decode_round_trip(frame_type: FrameType, payload: bytes) -> None:
    wire = encode(frame_type, payload)
    assert len(wire) == HEADER_SIZE + len(payload)
    assert wire[0] == frame_type
    assert int.from_bytes(wire[1:5], "big") == len(payload)
    decoder = FrameDecoder()
    assert decoder.feed(wire) == [Frame(frame_type, payload)]
    assert decoder.pending == 0


def test_encode_data_equals_generic_encode() -> None:
    assert encode_data(SSE) == encode(FrameType.DATA, SSE)
    assert HEARTBEAT_FRAME == encode(FrameType.HEARTBEAT) == bytes([3, 0, 0, 0, 0])


@pytest.mark.parametrize("head", [HEAD, ResponseHead(status=404), ResponseHead(status=500)])
def test_head_round_trip(head: ResponseHead) -> None:
    (frame,) = FrameDecoder().feed(encode_head(head))
    assert frame.type is FrameType.HEAD
    assert decode_head(frame.payload) == head


@pytest.mark.parametrize("end", [END_OK, END_ERR, ResponseEnd()])
def test_end_round_trip(end: ResponseEnd) -> None:
    (frame,) = FrameDecoder().feed(encode_end(end))
    assert frame.type is FrameType.END
    assert decode_end(frame.payload) == end


def test_whole_stream_in_one_feed() -> None:
    wire, frames = _stream()
    assert FrameDecoder().feed(wire) == frames


def test_byte_by_byte_yields_same_frames() -> None:
    wire, frames = _stream()
    decoder = FrameDecoder()
    out: list[Frame] = []
    for i in range(len(wire)):
        out += decoder.feed(wire[i : i + 1])
    assert out == frames
    assert decoder.pending == 0


@pytest.mark.parametrize("seed", range(20))
def test_random_splits_yield_same_frames(seed: int) -> None:
    wire, frames = _stream()
    rng = random.Random(seed)
    decoder = FrameDecoder()
    out: list[Frame] = []
    pos = 0
    while pos < len(wire):
        step = rng.choice([1, 2, 3, 4, 5, 7, 64, 1000, 40_000])
        out += decoder.feed(wire[pos : pos + step])
        pos += step
    assert out == frames
    assert decoder.pending == 0


@pytest.mark.parametrize("cut", [1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 3])
def test_split_frame_is_held_back(cut: int) -> None:
    wire = encode_data(b"hello world")
    decoder = FrameDecoder()
    assert decoder.feed(wire[:cut]) == []
    assert decoder.pending == cut
    assert decoder.feed(wire[cut:]) == [Frame(FrameType.DATA, b"hello world")]
    assert decoder.pending == 0


def test_complete_frames_returned_and_partial_tail_held() -> None:
    first = encode_data(b"one")
    second = encode_data(b"two")
    decoder = FrameDecoder()
    assert decoder.feed(first + second[:6]) == [Frame(FrameType.DATA, b"one")]
    assert decoder.pending == 6
    assert decoder.feed(second[6:]) == [Frame(FrameType.DATA, b"two")]


def test_empty_feed_is_harmless() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.pending == 0


@pytest.mark.parametrize(
    ("max_frame", "length", "ok"),
    [(10, 10, True), (10, 11, False), (0, 0, True), (0, 1, False)],
)
def test_frame_size_limit(max_frame: int, length: int, ok: bool) -> None:
    decoder = FrameDecoder(max_frame=max_frame)
    wire = encode_data(b"a" * length)
    if ok:
        assert decoder.feed(wire) == [Frame(FrameType.DATA, b"a" * length)]
    else:
        with pytest.raises(FrameError, match="exceeds"):
            decoder.feed(wire)


def test_oversize_frame_refused_from_header_alone() -> None:
    # The limit must bite before the payload arrives, or a peer could make us buffer it all.
    decoder = FrameDecoder(max_frame=1024)
    header = bytes([FrameType.DATA]) + (1 << 30).to_bytes(4, "big")
    with pytest.raises(FrameError):
        decoder.feed(header)


def test_default_limit_is_16_mib() -> None:
    header = bytes([FrameType.DATA]) + (framing.DEFAULT_MAX_FRAME + 1).to_bytes(4, "big")
    with pytest.raises(FrameError):
        FrameDecoder().feed(header)


@pytest.mark.parametrize("kind", [0, 7, 99, 255])
def test_unknown_frame_type(kind: int) -> None:
    with pytest.raises(FrameError, match="unknown frame type"):
        FrameDecoder().feed(bytes([kind]) + (2).to_bytes(4, "big") + b"xx")


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"{", b"[]", b'{"headers": []}', b'{"status": "two hundred"}', b"\xff"],
)
def test_malformed_head(payload: bytes) -> None:
    with pytest.raises(FrameError, match="HEAD"):
        decode_head(payload)


@pytest.mark.parametrize("payload", [b"", b"nope", b"[1]", b'{"ok": "maybe"}', b"\xfe\xff"])
def test_malformed_end(payload: bytes) -> None:
    with pytest.raises(FrameError, match="END"):
        decode_end(payload)
