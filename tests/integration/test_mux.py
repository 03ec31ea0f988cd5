"""The multiplexed upload over real HTTP: one long-lived POST carries every response."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from broker.core import State
from shared import framing
from shared.bench.upstream import FakeLLM
from shared.protocol import RELAY_PREFIX, RegisterRequest, ResponseEnd, ResponseHead
from tests.support.net import TcpForwarder, wait_for
from tests.support.stack import (
    TOKEN,
    USER_KEY,
    RunningBroker,
    RunningConnector,
    Stack,
    start_broker,
    start_connector,
)

pytestmark = pytest.mark.both_servers  # the multiplexed upload is a streaming request body

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def body(stream: bool, n: int = 20, content: str = "x") -> dict[str, Any]:
    return {
        "model": "fake-model",
        "stream": stream,
        "max_tokens": n,
        "messages": [{"role": "user", "content": content}],
    }


@pytest.fixture
async def mux_stack(tmp_path, fake_llm: FakeLLM) -> AsyncIterator[Stack]:
    # 50 concurrent requests of one key: over the default per-user concurrency limit.
    broker = await start_broker(tmp_path / "broker", concurrency_limit=64)
    conn = await start_connector(broker.url, fake_llm.url, upload_mode="mux", capacity=64)
    s = Stack(broker, [conn])
    yield s
    for c in s.connectors:
        await c.stop()
    await broker.stop()


def uploads(conn: RunningConnector) -> int:
    mux = conn.connector.mux
    assert mux is not None
    return mux.uploads


async def test_many_concurrent_streams_share_one_upload(
    mux_stack: Stack, fake_llm: FakeLLM
) -> None:
    conn = mux_stack.connectors[0]
    assert conn.connector.status.upload_mode == "mux"
    session = next(iter(mux_stack.broker.hub.core.sessions.values()))
    assert session.upload_mode.value == "mux"
    fake_llm.chunk_delay = 0.01
    async with openai.AsyncOpenAI(
        base_url=mux_stack.base_url, api_key=USER_KEY, max_retries=0
    ) as client:

        async def one(i: int) -> str:
            stream = await client.chat.completions.create(
                model="fake-model",
                messages=[{"role": "user", "content": f"q{i}"}],
                max_tokens=30,
                stream=True,
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        texts = await asyncio.gather(*(one(i) for i in range(50)))
    expected = "".join(f"tok{i} " for i in range(30))
    assert texts == [expected] * 50
    # All 50 answers went over the one upload opened at registration.
    assert uploads(conn) == 1
    await wait_for(lambda: mux_stack.broker.hub.core.in_flight() == 0)
    assert conn.connector.status.served == 50


async def test_non_streaming_and_upstream_errors_keep_their_status(
    mux_stack: Stack, fake_llm: FakeLLM
) -> None:
    async with mux_stack.client() as client:
        ok = await client.post("/v1/chat/completions", json=body(False, n=5))
        assert ok.status_code == 200
        assert ok.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4 "
        failed = await client.post("/v1/chat/completions", json=body(False, content="fail:429"))
        assert failed.status_code == 429
        assert failed.json()["error"]["message"] == "fake failure 429"
        big = await client.post("/v1/chat/completions", json=body(False, content="big:2000000"))
        assert big.status_code == 200
        assert len(big.json()["choices"][0]["message"]["content"]) == 2_000_000
    # 2 MB of answer: the upload was ended cleanly and reopened (rotation) on the way.
    assert uploads(mux_stack.connectors[0]) >= 3


async def test_slow_client_does_not_stall_the_others(tmp_path, fake_llm: FakeLLM) -> None:
    """A client that stops reading fails alone (client_too_slow) and its upstream call is
    closed; the others on the same upload stream on."""
    broker = await start_broker(tmp_path / "b", mux_buffer_limit=64 * 1024)
    conn = await start_connector(broker.url, fake_llm.url, upload_mode="mux", capacity=16)
    # ~8 MB/s for ~3 s: it fills the sockets' buffers and the broker's limit long before
    # the upstream is done.
    fake_llm.chunk_delay = 0.001
    try:
        # A raw socket that sends the request and does not read until the end.
        reader, writer = await asyncio.open_connection("127.0.0.1", broker.settings.port)
        request = httpx.Request(
            "POST",
            broker.url + "/v1/chat/completions",
            json=body(True, content="flood:3000:8000"),
            headers={"Authorization": f"Bearer {USER_KEY}", "Connection": "close"},
        )
        head = "POST /v1/chat/completions HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in request.headers.items()
        )
        writer.write(head.encode() + b"\r\n" + request.read())
        await writer.drain()
        await wait_for(lambda: fake_llm.active == 1)
        async with httpx.AsyncClient(
            base_url=broker.url, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=30
        ) as client:

            async def one() -> str:
                r = await client.post("/v1/chat/completions", json=body(True, n=40))
                assert r.status_code == 200
                return r.text

            texts = await asyncio.gather(*(one() for _ in range(8)))
        assert all(t.endswith("data: [DONE]\n\n") and "tok39" in t for t in texts)
        # The stalled request was failed and its upstream call closed; nothing leaks.
        await wait_for(lambda: fake_llm.active == 0, timeout=20)
        assert fake_llm.disconnects == 1
        await wait_for(lambda: broker.hub.core.in_flight() == 0, timeout=10)
        # What the slow client gets when it reads at last: the bytes that waited for it,
        # then the error event and [DONE].
        stalled = await asyncio.wait_for(reader.read(), 30)
        assert b"client_too_slow" in stalled[-2000:]
        assert stalled.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")  # then the chunked end
        writer.close()
    finally:
        await conn.stop()
        await broker.stop()


async def test_cancel_reaches_the_llm(mux_stack: Stack, fake_llm: FakeLLM) -> None:
    fake_llm.chunk_delay = 0.05
    async with mux_stack.client() as client:
        async with client.stream("POST", "/v1/chat/completions", json=body(True, 200)) as r:
            assert r.status_code == 200
            async for _ in r.aiter_bytes():
                break
    await wait_for(lambda: fake_llm.disconnects == 1, timeout=5)
    await wait_for(lambda: mux_stack.broker.hub.core.in_flight() == 0, timeout=5)
    await wait_for(lambda: not mux_stack.connectors[0].connector.tasks, timeout=5)
    # The upload itself lives on and carries the next request.
    async with mux_stack.client() as client:
        r = await client.post("/v1/chat/completions", json=body(False, n=3))
        assert r.status_code == 200
    assert uploads(mux_stack.connectors[0]) == 1


async def _register(broker: RunningBroker, http: httpx.AsyncClient, name: str) -> str:
    req = RegisterRequest(name=name, models=["fake-model"], capacity=4, mux_upload=True)
    r = await http.post(
        f"{broker.url}{RELAY_PREFIX}/sessions", content=req.model_dump_json(), headers=AUTH
    )
    assert r.status_code == 200 and r.json()["mux_upload"] is True
    return str(r.json()["session_id"])


class Lane:
    """A hand-driven multiplexed upload: the test writes the frames."""

    def __init__(self, http: httpx.AsyncClient, url: str) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.task = asyncio.create_task(http.post(url, content=self._body(), headers=AUTH))

    async def _body(self) -> AsyncIterator[bytes]:
        while (chunk := await self.queue.get()) is not None:
            yield chunk

    def send(self, rid: str, *frames: bytes) -> None:
        self.queue.put_nowait(framing.encode_mux(rid.encode(), b"".join(frames)))


async def test_lease_and_refused_frames(tmp_path) -> None:
    """The first frame acknowledges the lease; frames for a request the session does not
    hold are dropped and answered with a cancel item in the next poll (409's meaning)."""
    broker = await start_broker(tmp_path / "b", lease=0.5)
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            sid = await _register(broker, http, "hand")
            base = f"{broker.url}{RELAY_PREFIX}/sessions/{sid}"
            lane = Lane(http, base + "/mux")
            api = asyncio.create_task(
                http.post(
                    broker.url + "/v1/chat/completions",
                    json=body(False),
                    headers={"Authorization": f"Bearer {USER_KEY}"},
                )
            )
            poll = await http.post(base + "/poll", content=b"{}", headers=AUTH)
            rid = poll.json()["items"][0]["request_id"]
            pending = broker.hub.core.requests[rid]
            assert pending.state is State.LEASED
            lane.send(rid, framing.HEARTBEAT_FRAME)
            await wait_for(lambda: pending.state is State.ACTIVE)
            # Frames for a request this session never held: dropped, and a cancel item.
            lane.send("not-ours", framing.HEARTBEAT_FRAME)
            poll = await http.post(base + "/poll", content=b"{}", headers=AUTH)
            assert poll.json()["items"] == [{"type": "cancel", "request_id": "not-ours"}]
            head = ResponseHead(status=200, headers=[("content-type", "application/json")])
            lane.send(
                rid,
                framing.encode_head(head),
                framing.encode_data(b'{"ok": true}'),
                framing.encode_end(ResponseEnd()),
            )
            answer = await api
            assert answer.status_code == 200 and answer.json() == {"ok": True}
            lane.queue.put_nowait(framing.CLOSE_FRAME)
            lane.queue.put_nowait(None)
            assert (await lane.task).status_code == 200
    finally:
        await broker.stop()


async def test_cut_upload_fails_its_requests_and_the_next_one_serves(
    tmp_path, fake_llm: FakeLLM
) -> None:
    """A cut without CLOSE ends the requests it carried with an error (nothing is
    redispatched once bytes reached the user); the connector reopens and serves on."""
    broker = await start_broker(tmp_path / "b")
    forwarder = TcpForwarder(broker.settings.port)
    await forwarder.start()
    conn = await start_connector(forwarder.url, fake_llm.url, upload_mode="mux", capacity=8)
    fake_llm.chunk_delay = 0.05
    try:
        async with openai.AsyncOpenAI(
            base_url=broker.url + "/v1", api_key=USER_KEY, max_retries=0
        ) as client:
            stream = await client.chat.completions.create(
                model="fake-model",
                messages=[{"role": "user", "content": "x"}],
                max_tokens=200,
                stream=True,
            )
            got = []
            with pytest.raises(openai.APIError):
                async for chunk in stream:
                    got.append(chunk)
                    if len(got) == 3:
                        # Cut the upload's connection, as a proxy would.
                        assert forwarder.cut(b"/mux HTTP/1.1") == 1
            assert 3 <= len(got) < 200
            await wait_for(lambda: fake_llm.disconnects == 1, timeout=10)
            await wait_for(lambda: broker.hub.core.in_flight() == 0, timeout=10)
            fake_llm.chunk_delay = 0.0
            answer = await client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "x"}], max_tokens=4
            )
            assert answer.choices[0].message.content == "tok0 tok1 tok2 tok3 "
        assert uploads(conn) >= 2
    finally:
        await conn.stop()
        await forwarder.stop()
        await broker.stop()


async def test_old_broker_gets_per_request_uploads(tmp_path, fake_llm: FakeLLM) -> None:
    """A broker that does not offer mux: the connector falls back to per-request uploads."""
    broker = await start_broker(tmp_path / "b", mux_upload=False)
    conn = await start_connector(broker.url, fake_llm.url, upload_mode="mux")
    try:
        assert conn.connector.mux is None
        assert conn.connector.status.upload_mode == "stream"
        async with httpx.AsyncClient(
            base_url=broker.url, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=30
        ) as client:
            r = await client.post("/v1/chat/completions", json=body(False, n=3))
            assert r.status_code == 200
    finally:
        await conn.stop()
        await broker.stop()


async def test_mux_refused_for_a_session_without_it(tmp_path) -> None:
    broker = await start_broker(tmp_path / "b")
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            req = RegisterRequest(name="old", models=["m"], capacity=1)
            r = await http.post(
                f"{broker.url}{RELAY_PREFIX}/sessions", content=req.model_dump_json(), headers=AUTH
            )
            assert r.json()["mux_upload"] is False
            sid = r.json()["session_id"]
            r = await http.post(
                f"{broker.url}{RELAY_PREFIX}/sessions/{sid}/mux", content=b"", headers=AUTH
            )
            assert r.status_code == 409
            assert r.json()["error"]["code"] == "mux_not_granted"
    finally:
        await broker.stop()
