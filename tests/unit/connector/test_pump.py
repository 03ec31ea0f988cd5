"""``Upstream.pump`` ends every response with an END frame, whatever fails, and sends the
LLM what it should: the URL rule's target, the credentials, the request IDs.

The local LLM is a real aiohttp server on 127.0.0.1 (``tests.support.scripted_llm``); a
bug on our side is played by a pipe that raises where encoding a frame could.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid

import pytest
from aiohttp import web

from connector.pipe import FramePipe
from connector.settings import ConnectorSettings
from connector.upstream import Upstream
from shared.framing import FrameDecoder, FrameType
from shared.protocol import RequestItem, ResponseEnd, ResponseHead
from tests.support.net import free_port, wait_for
from tests.support.scripted_llm import scripted_llm

ITEM = RequestItem(request_id="r-1", model="m", path="/v1/chat/completions", body=b"{}")
Frames = list[tuple[FrameType, bytes]]


async def _stream(request: web.Request, chunks: int = 4, pause: float = 0.0) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for n in range(chunks):
        await response.write(f"data: {n}\n\n".encode())
        await asyncio.sleep(pause)
    return response


class Raising(FramePipe):
    """A pipe whose ``head`` or ``n``-th ``data`` raises ``error`` (a bug of ours)."""

    def __init__(self, error: Exception, at: str, n: int = 1) -> None:
        super().__init__(heartbeat=10)
        self.error, self.at, self.left = error, at, n

    def head(self, head: ResponseHead) -> None:
        if self.at == "head":
            raise self.error
        super().head(head)

    def data(self, chunk: bytes) -> None:
        self.left -= 1
        if self.at == "data" and self.left < 0:
            raise self.error
        super().data(chunk)


def _settings(url: str, **extra: object) -> ConnectorSettings:
    return ConnectorSettings(broker_url="http://b", broker_token="t", llm_url=url, **extra)


async def _pump(
    url: str, item: RequestItem = ITEM, pipe: FramePipe | None = None, **extra: object
) -> Frames:
    upstream = Upstream(_settings(url, **extra))
    pipe = pipe or FramePipe(heartbeat=10)
    try:
        await upstream.pump(item, pipe)
    finally:
        await upstream.aclose()
    assert pipe.ended
    decoder = FrameDecoder()
    frames = [(f.type, f.payload) for f in decoder.feed(pipe.drain())]
    assert decoder.pending == 0
    return frames


def _end(frames: Frames) -> ResponseEnd:
    kind, payload = frames[-1]
    assert kind is FrameType.END
    return ResponseEnd.model_validate(json.loads(payload))


@pytest.mark.parametrize("error", [RuntimeError("bug"), ValueError("odd"), KeyError("k")])
async def test_error_before_the_head_ends_with_an_error(error: Exception) -> None:
    async with scripted_llm(_stream) as llm:
        frames = await _pump(llm.url, pipe=Raising(error, "head"))
    assert [kind for kind, _ in frames] == [FrameType.END]
    end = _end(frames)
    assert (end.ok, end.status, end.error_type) == (False, 502, "connector_error")
    assert end.error is not None and "before the answer began" in end.error
    # The detail goes to the connector's log only: the END frame's text is fixed.
    assert type(error).__name__ not in end.error


@pytest.mark.parametrize("error", [RuntimeError("bug"), ValueError("odd"), ZeroDivisionError()])
async def test_error_mid_stream_ends_with_an_error_after_the_data(error: Exception) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        return await _stream(request, chunks=4, pause=0.05)

    async with scripted_llm(slow) as llm:
        frames = await _pump(llm.url, pipe=Raising(error, "data", n=2))
    assert [kind for kind, _ in frames] == [
        FrameType.HEAD,
        FrameType.DATA,
        FrameType.DATA,
        FrameType.END,
    ]
    end = _end(frames)
    assert (end.ok, end.status, end.error_type) == (False, 502, "connector_error")
    assert end.error is not None and "mid-response" in end.error


async def test_an_llm_that_is_down_is_unreachable() -> None:
    upstream = Upstream(_settings(f"http://127.0.0.1:{free_port()}"))
    pipe = FramePipe(heartbeat=10)
    try:
        await upstream.pump(ITEM, pipe)
    finally:
        await upstream.aclose()
    end = _end([(f.type, f.payload) for f in FrameDecoder().feed(pipe.drain())])
    assert (end.status, end.error_type) == (502, "upstream_unreachable")
    assert upstream.errors == {"upstream_unreachable": 1}


async def test_silence_before_and_during_the_answer_are_timeouts() -> None:
    async def late(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.Response(text="too late")

    async def stalls(request: web.Request) -> web.StreamResponse:
        return await _stream(request, chunks=2, pause=5)

    async with scripted_llm(late) as llm:
        before = _end(await _pump(llm.url, llm_read_timeout=0.3))
    async with scripted_llm(stalls) as llm:
        frames = await _pump(llm.url, llm_read_timeout=0.3)
    during = _end(frames)
    assert (before.status, before.error_type) == (504, "upstream_timeout")
    assert before.error is not None and "did not answer" in before.error
    assert [kind for kind, _ in frames] == [FrameType.HEAD, FrameType.DATA, FrameType.END]
    assert (during.status, during.error_type) == (504, "upstream_timeout")
    assert during.error is not None and "stopped sending" in during.error


async def test_a_dropped_connection_is_an_upstream_error_before_or_mid_response() -> None:
    async def hang_up(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    async def cut(request: web.Request) -> web.StreamResponse:
        response = await _stream(request, chunks=2)
        assert request.transport is not None
        request.transport.close()  # the chunked body never ends
        return response

    async with scripted_llm(hang_up) as llm:
        before = _end(await _pump(llm.url))
    async with scripted_llm(cut) as llm:
        mid = _end(await _pump(llm.url))
    assert (before.status, before.error_type) == (502, "upstream_error")
    assert before.error is not None and "before answering" in before.error
    assert (mid.status, mid.error_type) == (502, "upstream_error")
    assert mid.error is not None and "mid-response" in mid.error


async def test_a_clean_answer_passes_through_byte_for_byte() -> None:
    body = b'{"ok": true, "caf\xc3\xa9": 1}'

    async def answer(request: web.Request) -> web.StreamResponse:
        # Compressed-looking bytes stay as they are: the connector never decodes.
        headers = {"content-encoding": "gzip", "x-engine": "caf\u00e9", "keep-alive": "x"}
        return web.Response(body=body, headers=headers)

    async with scripted_llm(answer) as llm:
        frames = await _pump(llm.url)
    assert [kind for kind, _ in frames] == [FrameType.HEAD, FrameType.DATA, FrameType.END]
    assert frames[1][1] == body
    head = ResponseHead.model_validate(json.loads(frames[0][1]))
    names = {name.lower(): value for name, value in head.headers}
    assert names["content-encoding"] == "gzip"
    assert names["x-engine"] == "caf\u00e9"
    assert not names.keys() & {"connection", "keep-alive", "transfer-encoding"}
    assert _end(frames).ok


async def test_a_header_that_cannot_be_sent_ends_with_an_error() -> None:
    """A header value that is not ASCII fails before anything is sent."""
    item = ITEM.model_copy(update={"headers": {"x-note": "caf\u00e9 \u2603"}})
    async with scripted_llm(_stream) as llm:
        end = _end(await _pump(llm.url, item))
    assert (end.ok, end.status, end.error_type) == (False, 502, "connector_error")
    assert llm.seen == []


async def _answered(item: RequestItem, url: str, **extra: object) -> ResponseEnd:
    end = _end(await _pump(url, item, **extra))
    assert end.ok
    return end


async def test_what_the_llm_receives() -> None:
    """The target under --llm-url, Basic credentials from its userinfo, the request IDs."""
    rid = str(uuid.uuid4())
    item = ITEM.model_copy(
        update={"request_id": rid, "headers": {"content-type": "application/json"}}
    )
    async with scripted_llm(_stream, userinfo="al%40ice:s%3Acret") as llm:
        await _answered(item, llm.url + "/base/")
        await _answered(ITEM, llm.url + "/base", llm_api_key="k-1")
    first, second = llm.seen
    assert (first.method, first.target) == ("POST", "/base/v1/chat/completions")
    assert first.headers["authorization"] == "Basic " + base64.b64encode(b"al@ice:s:cret").decode()
    assert first.headers["x-request-id"] == rid
    assert first.headers["accept-encoding"] == "identity"
    assert first.headers["content-type"] == "application/json"
    assert first.body == b"{}"
    # The API key wins over the URL's credentials; a request ID that is not a UUID is
    # sent under the connector's own header only.
    assert second.headers["authorization"] == "Bearer k-1"
    assert "x-request-id" not in second.headers
    assert "r-1" in second.headers.values()
    # Nothing invented: no Content-Type the user did not send, no client User-Agent.
    assert "content-type" not in second.headers
    assert "user-agent" not in second.headers


@pytest.mark.parametrize(
    "path",
    ["http://elsewhere/v1/chat/completions", "/v1/../admin", "//elsewhere/v1/x", "/api/chat"],
)
async def test_the_url_rule_sends_nothing_elsewhere(path: str) -> None:
    item = ITEM.model_copy(update={"path": path})
    async with scripted_llm(_stream) as llm:
        end = _end(await _pump(llm.url, item))
        put = _end(await _pump(llm.url, ITEM.model_copy(update={"method": "PUT"})))
    assert not end.ok and end.status in (400, 404)
    assert (put.status, put.error_type) == (400, "invalid_method")
    assert llm.seen == []


async def test_a_cancelled_pump_closes_the_connection() -> None:
    """The API user went away: the LLM sees its connection close (and stops generating)."""
    gone = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            while True:
                await response.write(b"data: x\n\n")
                await asyncio.sleep(0.02)
        except (ConnectionError, asyncio.CancelledError):
            gone.set()
            raise

    upstream_pipe = FramePipe(heartbeat=10)
    async with scripted_llm(endless) as llm:
        upstream = Upstream(_settings(llm.url))
        try:
            task = asyncio.create_task(upstream.pump(ITEM, upstream_pipe))
            await wait_for(lambda: upstream_pipe.has_data, 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(gone.wait(), 10)
        finally:
            await upstream.aclose()
