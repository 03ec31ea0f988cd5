"""What a network attacker can hold open or send: slow heads, slow and large portal forms.

A real broker (portal on) with ``--header-timeout 1``: raw sockets send a request head that
never completes, trickled a byte at a time, to the API port and to the health port; a
portal form that stops half-way; a form larger than ``--portal-max-form``. Each on both
HTTP servers (``--server``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.portal.fake_gitlab import CLIENT_ID, CLIENT_SECRET
from tests.support.stack import RunningBroker, start_broker

HEADER_TIMEOUT = 1.0
# Slow heads and bodies are the HTTP server's business: check each server the broker offers.
pytestmark = pytest.mark.both_servers


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[RunningBroker]:
    running = await start_broker(
        tmp_path / "broker",
        gitlab_url="http://127.0.0.1:9",
        gitlab_client_id=CLIENT_ID,
        gitlab_client_secret=CLIENT_SECRET,
        gitlab_allow_any_user=True,
        header_timeout=HEADER_TIMEOUT,
        portal_max_form=4096,
    )
    yield running
    await running.stop()


async def open_for(port: int, first: bytes, trickle: bytes, limit: float) -> tuple[float, bytes]:
    """Send ``first``, then one byte of ``trickle`` every 0.2 s; seconds until the server
    closes the connection (or ``limit``), and what it answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    writer.write(first)
    answer = b""

    async def feed() -> None:
        for byte in trickle:
            await asyncio.sleep(0.2)
            writer.write(bytes([byte]))
            await writer.drain()

    feeder = asyncio.create_task(feed())
    try:
        while time.monotonic() - start < limit:
            chunk = await asyncio.wait_for(reader.read(4096), limit)
            if not chunk:
                break
            answer += chunk
    except (TimeoutError, ConnectionError):
        pass
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
        writer.close()
    return time.monotonic() - start, answer


@pytest.mark.parametrize("which", ["api", "health"])
async def test_a_request_head_that_never_ends_is_cut_at_the_header_timeout(
    broker: RunningBroker, which: str
) -> None:
    port = broker.settings.port if which == "api" else broker.settings.health_port
    head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
    took, answer = await open_for(port, head, b"X-Slow: " + b"a" * 60, limit=8.0)
    assert took < HEADER_TIMEOUT + 1.5, f"the {which} port held a partial head {took:.1f} s"
    assert answer == b""


async def test_a_portal_form_that_stops_half_way_gets_408(broker: RunningBroker) -> None:
    head = (
        b"POST /portal/keys HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nname="
    )
    took, answer = await open_for(broker.settings.port, head, b"", limit=8.0)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert took < HEADER_TIMEOUT + 3


async def test_a_portal_form_over_the_limit_gets_413_before_it_is_read(
    broker: RunningBroker,
) -> None:
    async with httpx.AsyncClient(base_url=broker.url, timeout=15, trust_env=False) as client:
        r = await client.post("/portal/keys", data={"name": "k" * 100_000})
        assert r.status_code == 413
        assert "--portal-max-form" in r.text and "4096" in r.text

        async def chunks() -> AsyncIterator[bytes]:
            yield b"name=" + b"k" * 10_000

        r = await client.post(
            "/portal/logout",
            content=chunks(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 411
        ok = await client.post("/portal/logout", data={"csrf_token": "x"})
        assert ok.status_code == 303  # a form of ordinary size still goes through


@pytest.mark.parametrize("which", ["api", "health"])
async def test_a_request_head_over_16_kib_is_refused_and_the_port_keeps_serving(
    broker: RunningBroker, which: str
) -> None:
    port = broker.settings.port if which == "api" else broker.settings.health_port
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 20_000 + b"\r\n"
    took, answer = await open_for(port, head, b"", limit=8.0)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert took < HEADER_TIMEOUT + 1.5
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        r = await client.get(f"http://127.0.0.1:{port}/health")
        assert r.status_code in (200, 404)


async def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(
    broker: RunningBroker,
) -> None:
    took, answer = await open_for(broker.settings.port, b"", b"", limit=8.0)
    assert took < HEADER_TIMEOUT + 1.5, f"an idle connection was held {took:.1f} s"
    assert answer == b""


async def test_a_kept_alive_connection_is_closed_at_the_header_timeout_and_no_server_header(
    broker: RunningBroker,
) -> None:
    head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\n\r\n"
    took, answer = await open_for(broker.settings.port, head, b"", limit=8.0)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    head_lines = answer.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")
    assert not [line for line in head_lines if line.startswith(b"server:")]
    assert [line for line in head_lines if line.startswith(b"date:")]
    assert took < HEADER_TIMEOUT + 1.5, f"a kept-alive connection was held {took:.1f} s"
