from __future__ import annotations

import asyncio
import time

from broker.core import Failure
from broker.state.channel import ResponseChannel
from shared.protocol import ResponseEnd, ResponseHead

HEAD = ResponseHead(status=200, headers=[("content-type", "text/event-stream")])
END = ResponseEnd(ok=True)


async def test_events_pushed_before_get_come_together_in_order() -> None:
    ch = ResponseChannel()
    ch.head(HEAD)
    ch.data(b"data: 1\n\n")
    ch.data(b"data: 2\n\n")
    ch.end(END)
    assert await ch.get(timeout=1) == [HEAD, b"data: 1\n\n", b"data: 2\n\n", END]
    assert ch.bytes_in == 18


async def test_get_returns_only_what_is_new() -> None:
    ch = ResponseChannel()
    ch.data(b"a")
    assert await ch.get(timeout=1) == [b"a"]
    ch.data(b"b")
    ch.data(b"c")
    assert await ch.get(timeout=1) == [b"b", b"c"]


async def test_get_times_out_with_nothing() -> None:
    ch = ResponseChannel()
    started = time.monotonic()
    assert await ch.get(timeout=0.005) == []
    assert time.monotonic() - started < 1.0


async def test_get_wakes_on_push_from_another_task() -> None:
    ch = ResponseChannel()
    loop = asyncio.get_running_loop()
    loop.call_soon(ch.data, b"x")
    loop.call_soon(ch.data, b"y")
    # Both pushes run before the waiting task resumes: they arrive in one batch.
    assert await ch.get(timeout=5) == [b"x", b"y"]


async def test_get_without_timeout_waits_for_a_push() -> None:
    ch = ResponseChannel()
    task = asyncio.create_task(ch.get())
    await asyncio.sleep(0)
    assert not task.done()
    ch.head(HEAD)
    assert await asyncio.wait_for(task, 1) == [HEAD]


async def test_pushes_after_end_are_ignored() -> None:
    ch = ResponseChannel()
    ch.data(b"a")
    ch.end(END)
    ch.data(b"late")
    ch.head(HEAD)
    ch.fail(Failure(502, "x", "late failure"))
    ch.end(ResponseEnd(ok=False, error="again"))
    assert await ch.get(timeout=1) == [b"a", END]
    assert await ch.get(timeout=0.005) == []


async def test_pushes_after_fail_are_ignored() -> None:
    ch = ResponseChannel()
    ch.fail(Failure(504, "timeout", "the response stalled"))
    ch.data(b"late")
    ch.end(END)
    assert await ch.get(timeout=1) == [Failure(504, "timeout", "the response stalled")]
    assert await ch.get(timeout=0.005) == []


async def test_cancelled_get_leaves_channel_usable() -> None:
    ch = ResponseChannel()
    task = asyncio.create_task(ch.get(timeout=10))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    ch.data(b"after")
    assert await ch.get(timeout=1) == [b"after"]
