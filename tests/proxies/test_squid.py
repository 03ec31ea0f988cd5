"""Scenario 1: connector -> squid (a strict forward proxy with basic auth) -> broker.

squid runs with Debian's default ACLs: CONNECT only to port 443, and (squid 5) no Upgrade
header forwarded, so WebSockets cannot pass. The relay's plain HTTP long-polls and
uploads do.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypercorn.asyncio import serve
from hypercorn.config import Config
from quart import Quart, websocket

from shared.bench.upstream import FakeLLM
from tests.proxies.measure import CHUNK_DELAY, expected_tokens, stream_timing
from tests.proxies.relay import (
    broker_health,
    chat,
    connector_error,
    connector_settings,
    content_of,
    run_check_cli,
)
from tests.proxies.servers import (
    PROXY_PASSWORD,
    PROXY_USER,
    ProxyProcess,
    squid_url,
    start_squid,
)
from tests.support.net import free_port, wait_port
from tests.support.stack import TOKEN, start_broker, start_connector


@pytest.fixture(scope="module")
def squid() -> Iterator[ProxyProcess]:
    proxy = start_squid()
    yield proxy
    proxy.stop()


async def test_relay_through_squid_via_env_proxy(
    tmp_path: Path, fake_llm: FakeLLM, squid: ProxyProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The connector finds the proxy (with user:pass) in HTTP_PROXY, as curl would.
    monkeypatch.setenv("HTTP_PROXY", squid_url(squid))
    broker = await start_broker(tmp_path / "b", poll_wait=5.0)
    fake_llm.chunk_delay = CHUNK_DELAY
    label = "squid (forward proxy, plain HTTP to the broker)"
    try:
        conn = await start_connector(broker.url, fake_llm.url, upload_mode="auto")
        try:
            # squid passes a chunked upload through as it comes: auto mode picks the
            # multiplexed upload (one long POST for every response).
            assert conn.connector.status.upload_mode == "mux"
            health = await broker_health(broker)
            assert [c["upload_mode"] for c in health["connectors"]] == ["mux"]
            timing = await stream_timing(broker.url, label, "mux")
            assert timing.tokens == expected_tokens()
            assert timing.incremental, timing
            assert content_of(await chat(broker.url)) == "tok0 tok1 tok2 "
            # Concurrent answers share the one upload through squid, each intact.
            replies = await asyncio.gather(
                *(chat(broker.url, f"q{i}", max_tokens=i + 1) for i in range(12))
            )
            assert [content_of(r) for r in replies] == [
                "".join(f"tok{j} " for j in range(i + 1)) for i in range(12)
            ]
            mux = conn.connector.mux
            assert mux is not None and mux.uploads == 1
        finally:
            await conn.stop()
        conn = await start_connector(broker.url, fake_llm.url, upload_mode="parts")
        try:
            health = await broker_health(broker)
            assert [c["upload_mode"] for c in health["connectors"]] == ["parts"]
            timing = await stream_timing(broker.url, label, "parts")
            assert timing.tokens == expected_tokens()
            assert timing.incremental, timing
            assert content_of(await chat(broker.url, max_tokens=2)) == "tok0 tok1 "
        finally:
            await conn.stop()
    finally:
        await broker.stop()
    # Every relay call went through squid, authenticated.
    access = squid.log("access.log")
    for path in ("/relay/v1/probe", "/relay/v1/sessions", "/poll", "/responses/", "/parts/"):
        assert path in access, path
    assert f" {PROXY_USER} " in access


async def test_explicit_proxy_without_valid_credentials_is_refused_clearly(
    tmp_path: Path, fake_llm: FakeLLM, squid: ProxyProcess
) -> None:
    broker = await start_broker(tmp_path / "b")
    try:
        wrong = squid_url(squid, password="wrong")
        error = await connector_error(connector_settings(broker.url, fake_llm.url, proxy=wrong))
        assert "HTTP 407" in error
        assert "proxy" in error and "credentials" in error
        assert "<html" not in error.lower()
        # The check says the same, one line per step, and exits 1.
        code, out = await run_check_cli(
            "--broker-url", broker.url, "--broker-token", TOKEN, "--llm-url", fake_llm.url,
            "--proxy", wrong,
        )  # fmt: skip
        assert code == 1, out
        assert _line(out, "proxy").startswith("ok") and "alice:***@" in _line(out, "proxy")
        assert PROXY_PASSWORD not in out and "wrong" not in out
        assert _line(out, "token").startswith("FAIL") and "407" in _line(out, "token")
        assert "USER:PASS" in _line(out, "token")
        assert _line(out, "llm").startswith("ok")
    finally:
        await broker.stop()


async def test_check_through_squid_reports_each_step(
    tmp_path: Path, fake_llm: FakeLLM, squid: ProxyProcess
) -> None:
    broker = await start_broker(tmp_path / "b")
    try:
        code, out = await run_check_cli(
            "--broker-url", broker.url, "--broker-token", TOKEN, "--llm-url", fake_llm.url,
            HTTP_PROXY=squid_url(squid),
        )  # fmt: skip
        assert code == 0, out
        assert "from HTTP_PROXY" in _line(out, "proxy")
        for step in ("dns", "tcp", "token", "upload", "llm"):
            assert _line(out, step).startswith("ok"), out
        assert "incrementally" in _line(out, "upload")
        assert "fake-model" in _line(out, "llm")
        # An https:// broker on a port other than 443: squid refuses the CONNECT tunnel.
        code, out = await run_check_cli(
            "--broker-url", f"https://127.0.0.1:{broker.settings.port}", "--broker-token", TOKEN,
            "--llm-url", fake_llm.url, "--proxy", squid_url(squid),
        )  # fmt: skip
        assert code == 1, out
        tunnel = _line(out, "tunnel")
        assert tunnel.startswith("FAIL") and "403" in tunnel and "443" in tunnel, out
        assert _line(out, "token").startswith("skip")
    finally:
        await broker.stop()


async def test_websocket_upgrade_fails_through_squid(squid: ProxyProcess) -> None:
    """The environment is as strict as claimed: a WebSocket server works directly only."""
    app = Quart("ws")

    @app.websocket("/ws")
    async def echo() -> None:
        await websocket.accept()
        await websocket.send(await websocket.receive())

    port = free_port()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = config.errorlog = None
    stop = asyncio.Event()
    server = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))
    await wait_port(port)
    auth = base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()
    upgrade = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )
    try:
        direct = await _exchange(
            port, f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{upgrade}\r\n"
        )
        assert direct.startswith("HTTP/1.1 101"), direct
        # What WebSocket clients do behind a proxy: CONNECT to the server's port.
        tunnel = await _exchange(
            squid.port,
            f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Proxy-Authorization: Basic {auth}\r\n\r\n",
        )
        assert tunnel.startswith("HTTP/1.1 403"), tunnel
        # A plain proxied GET asking for the upgrade: squid does not pass it on.
        proxied = await _exchange(
            squid.port,
            f"GET http://127.0.0.1:{port}/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Proxy-Authorization: Basic {auth}\r\n{upgrade}\r\n",
        )
        assert proxied.startswith("HTTP/1.1 ") and not proxied.startswith("HTTP/1.1 101")
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)


async def _exchange(port: int, request: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request.encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return head.decode("latin-1")
    finally:
        writer.close()


def _line(output: str, step: str) -> str:
    """The check's line for ``step``, without its verdict column's padding."""
    for line in output.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) >= 2 and parts[1] == step:
            return " ".join(parts[0:1] + parts[2:])
    raise AssertionError(f"no {step!r} line in:\n{output}")
