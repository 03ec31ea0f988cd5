from __future__ import annotations

import asyncio

from connector.pipe import FramePipe
from shared.framing import (
    HEARTBEAT_FRAME,
    Frame,
    FrameDecoder,
    FrameType,
    encode_data,
    encode_end,
    encode_head,
)
from shared.protocol import ResponseEnd, ResponseHead

HEAD = ResponseHead(status=200, headers=[("content-type", "text/event-stream")])
END = ResponseEnd(ok=True)


def _frames(data: bytes) -> list[Frame]:
    decoder = FrameDecoder()
    frames = decoder.feed(data)
    assert decoder.pending == 0
    return frames


async def _collect(pipe: FramePipe) -> list[bytes]:
    return [chunk async for chunk in pipe.frames()]


async def test_frames_pushed_in_one_tick_come_out_in_one_get() -> None:
    pipe = FramePipe(heartbeat=10)
    pipe.head(HEAD)
    pipe.data(b"data: a\n\n")
    pipe.data(b"data: b\n\n")
    assert pipe.buffered
    out = await pipe.get(timeout=1)
    assert out == encode_head(HEAD) + encode_data(b"data: a\n\n") + encode_data(b"data: b\n\n")
    assert not pipe.buffered
    assert pipe.has_data


async def test_pushes_from_other_callbacks_in_one_tick_are_batched() -> None:
    pipe = FramePipe(heartbeat=10)
    loop = asyncio.get_running_loop()
    loop.call_soon(pipe.data, b"1")
    loop.call_soon(pipe.data, b"2")
    loop.call_soon(pipe.data, b"3")
    out = await pipe.get(timeout=5)
    assert [f.payload for f in _frames(out)] == [b"1", b"2", b"3"]


async def test_get_times_out_empty() -> None:
    pipe = FramePipe(heartbeat=10)
    assert await pipe.get(timeout=0.005) == b""


async def test_empty_data_is_not_a_frame() -> None:
    pipe = FramePipe(heartbeat=10)
    pipe.data(b"")
    assert not pipe.buffered
    assert not pipe.has_data


async def test_end_only_once() -> None:
    pipe = FramePipe(heartbeat=10)
    pipe.end(END)
    pipe.end(ResponseEnd(ok=False, error="second"))
    assert pipe.ended
    assert pipe.drain() == encode_end(END)


async def test_frames_sends_heartbeat_after_silence_then_ends_after_end() -> None:
    pipe = FramePipe(heartbeat=0.005)
    chunks: list[bytes] = []

    async def consume() -> None:
        async for chunk in pipe.frames():
            chunks.append(chunk)
            if chunk == HEARTBEAT_FRAME and len(chunks) == 1:
                pipe.head(HEAD)
                pipe.data(b"hello")
                pipe.end(END)

    await asyncio.wait_for(consume(), timeout=5)
    assert chunks[0] == HEARTBEAT_FRAME
    body = b"".join(chunks[1:])
    assert _frames(body) == [
        Frame(FrameType.HEAD, HEAD.model_dump_json().encode()),
        Frame(FrameType.DATA, b"hello"),
        Frame(FrameType.END, END.model_dump_json().encode()),
    ]


async def test_frames_ends_after_buffered_end_without_heartbeat() -> None:
    pipe = FramePipe(heartbeat=10)
    pipe.head(HEAD)
    pipe.data(b"x")
    pipe.end(END)
    chunks = await asyncio.wait_for(_collect(pipe), timeout=1)
    assert chunks == [encode_head(HEAD) + encode_data(b"x") + encode_end(END)]


async def test_frames_wakes_on_end_from_another_task() -> None:
    pipe = FramePipe(heartbeat=10)
    collector = asyncio.create_task(_collect(pipe))
    await asyncio.sleep(0)
    pipe.data(b"late")
    pipe.end(END)
    chunks = await asyncio.wait_for(collector, timeout=1)
    assert [f.type for f in _frames(b"".join(chunks))] == [FrameType.DATA, FrameType.END]
    assert HEARTBEAT_FRAME not in chunks


async def test_explicit_heartbeat_frame() -> None:
    pipe = FramePipe(heartbeat=10)
    pipe.heartbeat_frame()
    assert await pipe.get(timeout=1) == HEARTBEAT_FRAME
