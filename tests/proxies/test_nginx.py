"""Scenario 3: API user and connector -> nginx with its default proxy settings -> broker.

nginx buffers whole request bodies (``proxy_request_buffering on``) and limits them to
1 MiB (``client_max_body_size 1m``), and buffers responses (``proxy_buffering on``) unless
the upstream sends ``X-Accel-Buffering: no``. The connector's auto mode must notice the
request buffering and switch to parts; users must still get their streams as produced.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shared.bench.upstream import FakeLLM
from tests.proxies.measure import CHUNK_DELAY, expected_tokens, stream_timing
from tests.proxies.relay import broker_health, chat, content_of
from tests.proxies.servers import DEFAULT_LOCATION, RECOMMENDED_SERVER, nginx_hits, start_nginx
from tests.support.stack import start_broker, start_connector

pytestmark = pytest.mark.both_servers  # nginx talks HTTP/1.1 keep-alive to the server

MIB = 1024 * 1024


async def test_auto_mode_picks_parts_and_streams_stay_incremental(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    broker = await start_broker(tmp_path / "b", poll_wait=5.0)
    nginx = start_nginx(broker.settings.port)
    # The control: the same nginx told to ignore the broker's X-Accel-Buffering header.
    ignoring = start_nginx(
        broker.settings.port,
        DEFAULT_LOCATION + "\n            proxy_ignore_headers X-Accel-Buffering;",
    )
    fake_llm.chunk_delay = CHUNK_DELAY
    label = "nginx (defaults: request+response buffering)"
    try:
        conn = await start_connector(nginx.url, fake_llm.url, upload_mode="auto")
        try:
            assert conn.connector.status.upload_mode == "parts"
            health = await broker_health(broker)
            assert [c["upload_mode"] for c in health["connectors"]] == ["parts"]
            # The API user also goes through nginx.
            timing = await stream_timing(nginx.url, label, "parts")
            assert timing.tokens == expected_tokens()
            assert timing.incremental, timing
            assert content_of(await chat(nginx.url)) == "tok0 tok1 tok2 "
            control = await stream_timing(
                ignoring.url, "nginx ignoring X-Accel-Buffering (control)", "parts"
            )
            assert control.tokens == expected_tokens()
        finally:
            await conn.stop()
        # Stream mode forced through the same nginx: nothing reaches the broker (or the
        # user) before the whole upload is in, which is why auto mode picks parts.
        conn = await start_connector(nginx.url, fake_llm.url, upload_mode="stream")
        try:
            forced = await stream_timing(nginx.url, label, "stream")
            assert forced.tokens == expected_tokens()
            assert not forced.incremental, forced
        finally:
            await conn.stop()
    finally:
        ignoring.stop()
        nginx.stop()
        await broker.stop()


async def test_parts_keep_every_post_under_nginx_body_limit(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    # A short lease and no redispatch so the forced-stream failure below ends quickly.
    broker = await start_broker(tmp_path / "b", poll_wait=5.0, lease=2.0, max_redispatch=0)
    nginx = start_nginx(broker.settings.port)
    size = 3 * MIB
    try:
        conn = await start_connector(nginx.url, fake_llm.url, upload_mode="auto")
        try:
            reply = await chat(broker.url, f"big:{size}")
            assert len(content_of(reply)) == size
        finally:
            await conn.stop()
        parts = [h for h in nginx_hits(nginx) if "/parts/" in h.uri]
        assert len(parts) >= 3 * MIB // (64 * 1024)
        assert all(h.status == 200 for h in parts), parts
        assert max(h.request_length for h in parts) < 200 * 1024  # well under 1 MiB

        # One long POST per response (stream mode) dies on nginx's 1 MiB default.
        conn = await start_connector(nginx.url, fake_llm.url, upload_mode="stream")
        try:
            failed = await asyncio.wait_for(chat(broker.url, f"big:{2 * MIB}"), 20)
            assert failed.status_code == 502, failed.text
        finally:
            await conn.stop()
        assert any(h.status == 413 and "/responses/" in h.uri for h in nginx_hits(nginx))
    finally:
        nginx.stop()
        await broker.stop()


async def test_recommended_nginx_keeps_stream_mode(tmp_path: Path, fake_llm: FakeLLM) -> None:
    broker = await start_broker(tmp_path / "b", poll_wait=5.0)
    nginx = start_nginx(broker.settings.port, server=RECOMMENDED_SERVER)
    fake_llm.chunk_delay = CHUNK_DELAY
    label = "nginx (recommended: no buffering on /relay/)"
    try:
        for mode in ("auto", "parts"):
            conn = await start_connector(nginx.url, fake_llm.url, upload_mode=mode)
            try:
                chosen = conn.connector.status.upload_mode
                assert chosen == ("mux" if mode == "auto" else "parts")
                timing = await stream_timing(nginx.url, label, chosen)
                assert timing.tokens == expected_tokens()
                assert timing.incremental, timing
                if chosen == "mux":
                    # One long upload past nginx's 1 MiB default: no limit on /relay/.
                    reply = await chat(nginx.url, f"big:{2 * MIB}")
                    assert len(content_of(reply)) == 2 * MIB
            finally:
                await conn.stop()
    finally:
        nginx.stop()
        await broker.stop()


# nginx told not to buffer request bodies, but with its default 1 MiB body limit.
STREAMING_DEFAULT_LIMIT = """\
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_request_buffering off;
            proxy_buffering off;"""


async def test_mux_uploads_stay_under_nginx_body_limit(tmp_path: Path, fake_llm: FakeLLM) -> None:
    """The multiplexed upload ends cleanly and reopens every 768 KiB, so a proxy that streams
    bodies but refuses any over 1 MiB carries answers of any size, many at once."""
    broker = await start_broker(tmp_path / "b", poll_wait=5.0)
    nginx = start_nginx(broker.settings.port, STREAMING_DEFAULT_LIMIT)
    fake_llm.chunk_delay = CHUNK_DELAY
    try:
        conn = await start_connector(nginx.url, fake_llm.url, upload_mode="auto")
        try:
            assert conn.connector.status.upload_mode == "mux"
            timing = await stream_timing(nginx.url, "nginx (no request buffering, 1 MiB)", "mux")
            assert timing.incremental, timing
            fake_llm.chunk_delay = 0.0
            sizes = [3 * MIB, MIB, 600 * 1024, 10]
            replies = await asyncio.gather(*(chat(broker.url, f"big:{n}") for n in sizes))
            assert [len(content_of(r)) for r in replies] == sizes
        finally:
            await conn.stop()
        mux = [h for h in nginx_hits(nginx) if h.uri.endswith("/mux")]
        assert len(mux) >= 6  # ~4.6 MiB of answers in uploads of at most ~1 MiB
        assert all(h.status == 200 for h in mux), mux
        assert max(h.request_length for h in mux) < MIB
    finally:
        nginx.stop()
        await broker.stop()
