"""``Upstream.pump`` ends every response with an END frame, whatever fails.

No sockets: the local LLM is an ``httpx.MockTransport`` that raises where a bug or an odd
transport would.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from connector.pipe import FramePipe
from connector.settings import ConnectorSettings
from connector.upstream import Upstream
from shared.framing import FrameDecoder, FrameType
from shared.protocol import RequestItem, ResponseEnd

ITEM = RequestItem(request_id="r-1", model="m", path="/v1/chat/completions", body="{}")


class Boom(AsyncIterator[bytes]):
    """A response body that yields ``good`` chunks, then raises ``error``."""

    def __init__(self, good: int, error: Exception) -> None:
        self.left = good
        self.error = error

    def __aiter__(self) -> Boom:
        return self

    async def __anext__(self) -> bytes:
        if self.left == 0:
            raise self.error
        self.left -= 1
        return b"data: x\n\n"


class Stream(httpx.AsyncByteStream):
    def __init__(self, body: Boom) -> None:
        self.body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.body:
            yield chunk


async def _pump(
    handler: httpx.MockTransport, item: RequestItem = ITEM
) -> list[tuple[FrameType, bytes]]:
    settings = ConnectorSettings(broker_url="http://b", broker_token="t", llm_url="http://llm")
    upstream = Upstream(settings, transport=handler)
    pipe = FramePipe(heartbeat=10)
    try:
        await upstream.pump(item, pipe)
    finally:
        await upstream.aclose()
    assert pipe.ended
    decoder = FrameDecoder()
    frames = [(f.type, f.payload) for f in decoder.feed(pipe.drain())]
    assert decoder.pending == 0
    return frames


def _end(frames: list[tuple[FrameType, bytes]]) -> ResponseEnd:
    kind, payload = frames[-1]
    assert kind is FrameType.END
    return ResponseEnd.model_validate(json.loads(payload))


@pytest.mark.parametrize("error", [RuntimeError("bug"), ValueError("odd"), KeyError("k")])
async def test_error_before_the_head_ends_with_an_error(error: Exception) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        raise error

    frames = await _pump(httpx.MockTransport(handle))
    assert [kind for kind, _ in frames] == [FrameType.END]
    end = _end(frames)
    assert (end.ok, end.status, end.error_type) == (False, 502, "connector_error")
    assert end.error is not None and "before the answer began" in end.error
    # The detail goes to the connector's log only: the END frame's text is fixed.
    assert type(error).__name__ not in end.error


@pytest.mark.parametrize("error", [RuntimeError("bug"), ValueError("odd"), ZeroDivisionError()])
async def test_error_mid_stream_ends_with_an_error_after_the_data(error: Exception) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=Stream(Boom(2, error))
        )

    frames = await _pump(httpx.MockTransport(handle))
    assert [kind for kind, _ in frames] == [
        FrameType.HEAD,
        FrameType.DATA,
        FrameType.DATA,
        FrameType.END,
    ]
    end = _end(frames)
    assert (end.ok, end.status, end.error_type) == (False, 502, "connector_error")
    assert end.error is not None and "mid-response" in end.error


async def test_httpx_errors_keep_their_own_answers() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    end = _end(await _pump(httpx.MockTransport(handle)))
    assert (end.status, end.error_type) == (502, "upstream_unreachable")


async def test_a_clean_answer_ends_ok() -> None:
    class Once(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b'{"ok": true}'

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Once())

    frames = await _pump(httpx.MockTransport(handle))
    assert [kind for kind, _ in frames] == [FrameType.HEAD, FrameType.DATA, FrameType.END]
    assert _end(frames).ok


async def test_a_request_httpx_cannot_build_ends_with_an_error() -> None:
    """A header value httpx cannot encode fails before anything is sent."""
    item = ITEM.model_copy(update={"headers": {"x-note": "caf\u00e9 \u2603"}})

    def handle(request: httpx.Request) -> httpx.Response:
        raise AssertionError("nothing should be sent")

    end = _end(await _pump(httpx.MockTransport(handle), item))
    assert (end.ok, end.status, end.error_type) == (False, 502, "connector_error")
