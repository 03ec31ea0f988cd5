"""The connector's side of sessions against a scripted relay (``httpx.MockTransport``; the
local LLM, when a test needs one, is a real server: ``tests.support.scripted_llm``).

What the broker says about replaced sessions (``replaced=live``, 404 ``session_replaced``),
how soon the connector registers again, and that the probes' verdict is reused across
re-registrations. No broker process: each test scripts the answers it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import structlog
from aiohttp import web

from connector import models, runner, trouble
from connector.broker_client import BrokerClient
from connector.health import HealthServer
from connector.runner import Connector
from connector.settings import ConnectorSettings
from connector.upstream import Upstream
from shared.protocol import RegisterRequest, RegisterResponse, Replaced, UploadMode
from tests.support.net import free_port, wait_for
from tests.support.scripted_llm import scripted_llm


def _error(status: int, code: str) -> httpx.Response:
    body = {"error": {"message": code, "type": "relay_error", "param": None, "code": code}}
    return httpx.Response(status, content=json.dumps(body).encode())


class _Pieces(httpx.AsyncByteStream):
    """The download probe's answer, all at once (as a buffering path would deliver it)."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"a" * 10


@dataclass
class ScriptedRelay:
    """Answers relay calls; ``polls`` is the script of poll answers (then: empty polls)."""

    replaced: list[Replaced] = field(default_factory=list)
    polls: list[httpx.Response] = field(default_factory=list)
    registrations: list[tuple[float, RegisterRequest]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/relay/v1")
        self.calls.append(f"{request.method} {path}")
        if path == "/probe" and request.method == "POST":
            await request.aread()
            return httpx.Response(
                200, content=b'{"incremental": true, "chunks": 3, "spread_ms": 600.0}'
            )
        if path == "/probe":
            return httpx.Response(200, stream=_Pieces())
        if path == "/sessions":
            reg = RegisterRequest.model_validate_json(await request.aread())
            loop = asyncio.get_running_loop()
            self.registrations.append((loop.time(), reg))
            replaced = self.replaced.pop(0) if self.replaced else Replaced.NONE
            reply = RegisterResponse(
                session_id=f"s-{len(self.registrations)}",
                poll_wait_s=0.2,
                lease_s=15,
                session_ttl_s=60,
                heartbeat_s=15,
                upload_mode=reg.upload_mode,
                max_part_bytes=65536,
                replaced=replaced,
            )
            return httpx.Response(200, content=reply.model_dump_json().encode())
        if path.endswith("/poll"):
            if self.polls:
                return self.polls.pop(0)
            await asyncio.sleep(0.05)
            return httpx.Response(200, content=b'{"items": []}')
        return httpx.Response(200, content=b"{}")


def _settings(**overrides: Any) -> ConnectorSettings:
    values: dict[str, Any] = {
        "broker_url": "http://broker.test",
        "broker_token": "ct-test",
        "llm_url": "http://llm.test",
        "models": ["m"],
        "capacity": 2,
        "upload_mode": "stream",
        "poll_mode": "classic",
        "name": "box:llm",
    }
    values.update(overrides)
    return ConnectorSettings(**values)


@contextlib.asynccontextmanager
async def running(relay: ScriptedRelay, **overrides: Any) -> AsyncIterator[Connector]:
    settings = _settings(**overrides)
    broker = BrokerClient(settings, httpx.MockTransport(relay.handle))
    connector = Connector(settings, broker=broker)
    task = asyncio.create_task(connector.run())
    try:
        yield connector
    finally:
        connector.request_stop()
        await asyncio.wait_for(task, 10)


def _events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("event") == name]


async def _until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    await wait_for(check, timeout)


async def test_registration_sends_instance_capacity_and_source() -> None:
    relay = ScriptedRelay()
    async with running(relay) as connector:
        await _until(lambda: len(relay.registrations) == 1)
    reg = relay.registrations[0][1]
    assert (reg.name, reg.capacity, reg.capacity_source) == ("box:llm", 2, "--capacity")
    assert len(reg.instance_id) == 32 and reg.instance_id == connector.instance_id


async def test_replaced_live_at_registration_warns_with_a_hint() -> None:
    relay = ScriptedRelay(replaced=[Replaced.LIVE])
    with structlog.testing.capture_logs() as logs:
        async with running(relay):
            await _until(lambda: len(relay.registrations) == 1)
            await asyncio.sleep(0.1)
    clashes = _events(logs, "connector_name_clash")
    assert len(clashes) == 1
    assert clashes[0]["log_level"] == "warning"
    assert clashes[0]["name"] == "box:llm"
    assert "--name" in clashes[0]["hint"]


async def test_restart_replacement_is_not_a_clash() -> None:
    relay = ScriptedRelay(replaced=[Replaced.RESTART])
    with structlog.testing.capture_logs() as logs:
        async with running(relay):
            await _until(lambda: len(relay.registrations) == 1)
            await asyncio.sleep(0.1)
    assert _events(logs, "connector_name_clash") == []


async def test_session_replaced_warns_then_registers_again_after_a_pause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(trouble, "CLASH_RETRY", (0.4, 0.4))
    relay = ScriptedRelay(polls=[_error(404, "session_replaced")])
    with structlog.testing.capture_logs() as logs:
        async with running(relay):
            await _until(lambda: len(relay.registrations) == 2)
    (first, _), (second, _) = relay.registrations
    assert second - first >= 0.4  # no tight loop between two processes sharing a name
    clashes = _events(logs, "connector_name_clash")
    assert [c["seen_in"] for c in clashes] == ["poll"]
    assert "--name" in clashes[0]["hint"]


async def test_session_unknown_registers_again_at_once() -> None:
    relay = ScriptedRelay(polls=[_error(404, "session_unknown")])
    with structlog.testing.capture_logs() as logs:
        async with running(relay):
            await _until(lambda: len(relay.registrations) == 2)
    (first, _), (second, _) = relay.registrations
    assert second - first < 0.3
    assert _events(logs, "connector_name_clash") == []


async def test_probe_verdict_is_reused_across_re_registrations() -> None:
    relay = ScriptedRelay(polls=[_error(404, "session_unknown"), _error(404, "session_unknown")])
    with structlog.testing.capture_logs() as logs:
        async with running(relay, upload_mode="auto", poll_mode="auto"):
            await _until(lambda: len(relay.registrations) == 3)
    probes = [c for c in relay.calls if c.endswith("/probe")]
    assert probes == ["POST /probe", "GET /probe"]  # once, for the first registration only
    assert [r.upload_mode for _, r in relay.registrations] == [UploadMode.STREAM] * 3
    assert [e["probes_reused"] for e in _events(logs, "registered")] == [False, True, True]


async def test_a_proxy_answer_forgets_the_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    relay = ScriptedRelay(polls=[_error(404, "session_unknown")])
    async with running(relay, upload_mode="auto", poll_mode="auto") as connector:
        await _until(lambda: len(relay.registrations) == 2)
        connector.forget_path("test: a proxy answered")
        relay.polls.append(_error(404, "session_unknown"))
        await _until(lambda: len(relay.registrations) == 3)
    probes = [c for c in relay.calls if c.endswith("/probe")]
    assert probes == ["POST /probe", "GET /probe"] * 2


async def test_unreachable_broker_is_retried_about_every_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Many failed tries in a row: the waits stay short (capped), not 0.5 s doubling."""
    delays: list[float] = []
    real = runner.Connector._pause

    async def pause(self: Connector, delay: float) -> None:
        delays.append(delay)
        await real(self, 0.0)

    monkeypatch.setattr(runner.Connector, "_pause", pause)

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    settings = _settings()
    connector = Connector(settings, broker=BrokerClient(settings, httpx.MockTransport(refuse)))
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(connector.run())
        await _until(lambda: len(delays) >= 12)
        connector.request_stop()
        await asyncio.wait_for(task, 10)
    assert max(delays) <= trouble.UNREACHABLE_RETRY
    # Frequent tries, but not a warning each: the first few, then one per 30 s.
    warned = [e for e in _events(logs, "broker_unreachable") if e["log_level"] == "warning"]
    assert [e["tries"] for e in warned] == [1, 2, 3]


async def test_capacity_asked_again_once_the_llm_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "EMPTY_MODELS_REFRESH", 0.1)

    async def llm(request: web.Request) -> web.StreamResponse:
        if request.path == "/props":
            return web.Response(body=b'{"total_slots": 3}')
        return web.Response(status=404, body=b"{}")

    # The local LLM is down (nothing listens on its port) until the first registration.
    port = free_port()
    relay = ScriptedRelay()
    settings = _settings(capacity="auto", llm_url=f"http://127.0.0.1:{port}")
    connector = Connector(
        settings,
        broker=BrokerClient(settings, httpx.MockTransport(relay.handle)),
        upstream=Upstream(settings),
    )
    task = asyncio.create_task(connector.run())
    try:
        await _until(lambda: len(relay.registrations) == 1)
        first = relay.registrations[0][1]
        assert (first.capacity, first.capacity_source) == (64, connector.capacity.source)
        assert "did not answer" in first.capacity_source
        async with scripted_llm(llm, port=port):
            await _until(lambda: len(relay.registrations) == 2)
    finally:
        connector.request_stop()
        await asyncio.wait_for(task, 10)
    second = relay.registrations[1][1]
    assert (second.capacity, second.capacity_source) == (3, "llama.cpp /props total_slots")
    assert second.instance_id == first.instance_id
    # The old session ended before the new one began.
    registers = [i for i, c in enumerate(relay.calls) if c == "POST /sessions"]
    assert registers[0] < relay.calls.index("DELETE /sessions/s-1") < registers[1]
    snap = HealthServer(connector, "127.0.0.1", 0).snapshot()
    assert (snap["capacity"], snap["capacity_source"]) == (3, "llama.cpp /props total_slots")


async def test_a_lasting_clash_warns_once_a_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trouble, "CLASH_RETRY", (0.05, 0.05))
    relay = ScriptedRelay(replaced=[Replaced.LIVE] * 4, polls=[_error(404, "session_replaced")] * 3)
    with structlog.testing.capture_logs() as logs:
        async with running(relay):
            await _until(lambda: len(relay.registrations) == 4)
    assert len(_events(logs, "connector_name_clash")) == 1
