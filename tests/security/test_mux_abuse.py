"""A connector token holder abusing the multiplexed upload, against a real broker.

Who: anyone with a connector token (or a second connector of the same operator gone
wrong). What: MUX frames tagged with another session's request ID, and floods of made-up
request IDs. The fix: such frames never touch another session's request and cost O(1)
(no list scans, a bounded set of cancels, one log line per upload).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import structlog

from broker.core.relay import MAX_REFUSALS
from shared import framing
from shared.protocol import RELAY_PREFIX, RegisterRequest, ResponseEnd, ResponseHead
from tests.support.stack import TOKEN, USER_KEY, RunningBroker, start_broker

pytestmark = pytest.mark.both_states  # relay semantics: in memory and in Redis
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HEAD = ResponseHead(status=200, headers=[("content-type", "application/json")])


class Lane:
    """A hand-written multiplexed upload of one session."""

    def __init__(self, http: httpx.AsyncClient, broker: RunningBroker, sid: str) -> None:
        self.base = f"{broker.url}{RELAY_PREFIX}/sessions/{sid}"
        self.http = http
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.task = asyncio.create_task(http.post(self.base + "/mux", content=self._body()))

    async def _body(self) -> AsyncIterator[bytes]:
        while (chunk := await self.queue.get()) is not None:
            yield chunk

    def send(self, rid: str, *frames: bytes) -> None:
        self.queue.put_nowait(framing.encode_mux(rid.encode(), b"".join(frames)))

    async def poll(self) -> list[dict[str, Any]]:
        r = await self.http.post(self.base + "/poll", content=b"{}")
        assert r.status_code == 200
        items: list[dict[str, Any]] = r.json()["items"]
        return items

    async def close(self) -> None:
        self.queue.put_nowait(framing.CLOSE_FRAME)
        self.queue.put_nowait(None)
        assert (await self.task).status_code == 200


async def _session(http: httpx.AsyncClient, broker: RunningBroker, name: str, model: str) -> str:
    req = RegisterRequest(name=name, models=[model], capacity=4, mux_upload=True)
    r = await http.post(f"{broker.url}{RELAY_PREFIX}/sessions", content=req.model_dump_json())
    assert r.status_code == 200 and r.json()["mux_upload"] is True
    return str(r.json()["session_id"])


def _ask(http: httpx.AsyncClient, broker: RunningBroker) -> asyncio.Task[httpx.Response]:
    payload = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}
    return asyncio.create_task(
        http.post(
            broker.url + "/v1/chat/completions",
            json=payload,
            headers={"Authorization": f"Bearer {USER_KEY}"},
        )
    )


async def _victim_and_attacker(
    http: httpx.AsyncClient, broker: RunningBroker
) -> tuple[Lane, Lane, str, asyncio.Task[httpx.Response]]:
    victim = Lane(http, broker, await _session(http, broker, "victim", "fake-model"))
    attacker = Lane(http, broker, await _session(http, broker, "attacker", "other-model"))
    api = _ask(http, broker)
    (item,) = await victim.poll()
    return victim, attacker, str(item["request_id"]), api


async def _attack(attacker: Lane, rid: str) -> None:
    """Frames of a request the attacker does not hold; its next poll shows they were read."""
    attacker.send(rid, framing.encode_data(b'{"evil": true}'))
    attacker.send(rid, framing.encode_end(ResponseEnd()))
    assert {"type": "cancel", "request_id": rid} in await attacker.poll()


async def test_frames_for_a_request_being_uploaded_by_another_session_leave_it_alone(
    tmp_path,
) -> None:
    broker = await start_broker(tmp_path / "b")
    try:
        async with httpx.AsyncClient(timeout=20, headers=AUTH) as http:
            victim, attacker, rid, api = await _victim_and_attacker(http, broker)
            victim.send(rid, framing.encode_head(HEAD))  # the victim's upload has begun
            await asyncio.sleep(0.1)
            await _attack(attacker, rid)
            victim.send(
                rid, framing.encode_data(b'{"ok": true}'), framing.encode_end(ResponseEnd())
            )
            answer = await api
            assert answer.status_code == 200 and answer.json() == {"ok": True}
            await victim.close()
            await attacker.close()
    finally:
        await broker.stop()


async def test_frames_for_a_request_not_yet_uploaded_do_not_silence_its_owner(
    tmp_path,
) -> None:
    broker = await start_broker(tmp_path / "b")
    try:
        async with httpx.AsyncClient(timeout=20, headers=AUTH) as http:
            victim, attacker, rid, api = await _victim_and_attacker(http, broker)
            await _attack(attacker, rid)  # before the victim's first frame
            victim.send(
                rid,
                framing.encode_head(HEAD),
                framing.encode_data(b'{"ok": true}'),
                framing.encode_end(ResponseEnd()),
            )
            answer = await asyncio.wait_for(api, 10)
            assert answer.status_code == 200 and answer.json() == {"ok": True}
            await victim.close()
            await attacker.close()
    finally:
        await broker.stop()


async def test_a_flood_of_made_up_request_ids_is_bounded_and_logged_once(tmp_path) -> None:
    broker = await start_broker(tmp_path / "b")
    flood = 3 * MAX_REFUSALS
    try:
        async with httpx.AsyncClient(timeout=30, headers=AUTH) as http:
            lane = Lane(http, broker, await _session(http, broker, "flooder", "fake-model"))
            with structlog.testing.capture_logs() as logs:
                for i in range(flood):
                    lane.send(f"made-up-{i}", framing.HEARTBEAT_FRAME)
                await lane.close()
            refused = [e for e in logs if e["event"].startswith("mux_frames_refused")]
            # One line when it starts, one total at the end: not one per frame.
            assert len(refused) == 2
            assert refused[-1]["frames"] == flood
            # The cancels the session is owed stay bounded whatever it sends.
            items = await lane.poll()
            assert len(items) == MAX_REFUSALS
    finally:
        await broker.stop()
