"""An operator's broken edit of a broker-owned YAML file survives the next change.

Who: an enrolling stranger (no token needed) against a broker with enrollment on. The
operator saves ``enrolled_connectors.yaml`` with a typo; the broker logs it and keeps
serving the last good entries. Before the fix the broken file's stamp was taken as the
current one, so the next change (one unauthenticated ``POST /relay/v1/enroll``) wrote the
last good state over the operator's edit: their fix-in-progress was lost, and with it any
revocation they had just typed. Now every store keeps the broken file untouched and
refuses changes until it parses again.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from shared.protocol import RELAY_PREFIX, EnrollRequest
from tests.support.stack import RunningBroker, start_broker

BROKEN = "connectors: [ {id: e-1, name: typo\n"


def _ask(secret: str) -> bytes:
    return EnrollRequest(name="box:llm", models=["m1"], secret=secret).model_dump_json().encode()


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[RunningBroker]:
    running = await start_broker(tmp_path / "b", allow_enrollment=True)
    yield running
    await running.stop()


def _edit(path: Path, text: str) -> None:
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text, encoding="utf-8")
    if path.stat().st_mtime_ns <= before:
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


async def test_an_enroll_request_never_overwrites_a_broken_operator_edit(
    broker: RunningBroker,
) -> None:
    store = broker.server.state.enrollment
    assert store is not None
    async with httpx.AsyncClient(base_url=broker.url + RELAY_PREFIX, timeout=10) as relay:
        first = await relay.post("/enroll", content=_ask("a" * 48))
        assert first.status_code == 202
        _edit(store.path, BROKEN)
        assert not store.reload()  # logged; the last good entries keep serving
        assert store.error is not None
        stranger = await relay.post("/enroll", content=_ask("s" * 48))
        assert store.path.read_text(encoding="utf-8") == BROKEN  # the operator's edit stays
        assert stranger.status_code == 503
        assert stranger.json()["error"]["code"] == "enrollment_paused"
        assert "Retry-After" in stranger.headers
        again = await relay.post("/enroll", content=_ask("a" * 48))  # known entry: served
        assert again.status_code == 202
        _edit(store.path, "connectors: []\n")  # the operator fixes the file
        assert store.reload()
        fixed = await relay.post("/enroll", content=_ask("s" * 48))
        assert fixed.status_code == 202
