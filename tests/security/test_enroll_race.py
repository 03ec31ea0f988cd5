"""An enrolling stranger racing a real connector for its token, against a real broker.

Who: anyone who can reach ``POST /relay/v1/enroll`` while enrollment is on. Behind a proxy
without --trusted-proxies every asker has the proxy's address (here all ask from
127.0.0.1), so "same name and address" named nobody in particular: a racer asking with
the connector's name took over its pending entry and collected the approved token. The
fix: entries are matched by their secret only, the approval page shows a fingerprint of
the secret that the connector prints, and the file is written only when an entry changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import structlog

from broker.accounts import enrollment
from connector.enroll import enroll
from connector.settings import ConnectorSettings
from shared.bench.upstream import FakeLLM
from shared.fingerprint import fingerprint
from shared.protocol import RELAY_PREFIX, EnrollRequest
from tests.portal.fake_gitlab import CLIENT_ID, CLIENT_SECRET, FakeGitLab
from tests.portal.helpers import csrf_of, login
from tests.support.net import wait_for
from tests.support.stack import RunningBroker, start_broker

NAME = "gpu-box:llm"


def _ask(secret: str) -> bytes:
    return EnrollRequest(name=NAME, models=["m1"], secret=secret).model_dump_json().encode()


@pytest.fixture
async def gitlab() -> AsyncIterator[FakeGitLab]:
    fake = FakeGitLab()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def broker(tmp_path: Path, gitlab: FakeGitLab) -> AsyncIterator[RunningBroker]:
    running = await start_broker(
        tmp_path / "b",
        allow_enrollment=True,
        gitlab_url=gitlab.url,
        gitlab_client_id=CLIENT_ID,
        gitlab_client_secret=CLIENT_SECRET,
        admin_ids=[1001],
        gitlab_allowed_groups=["team"],
    )
    yield running
    await running.stop()


async def test_a_racer_with_the_same_name_and_address_never_gets_the_token(
    broker: RunningBroker,
) -> None:
    store = broker.server.state.enrollment
    assert store is not None
    victim_secret, racer_secret = "v" * 48, "r" * 48
    async with httpx.AsyncClient(base_url=broker.url + RELAY_PREFIX, timeout=10) as relay:
        victim = await relay.post("/enroll", content=_ask(victim_secret))
        assert victim.status_code == 202
        racer = await relay.post("/enroll", content=_ask(racer_secret))
        assert racer.status_code == 202
        # The operator approves the entry the connector told them about.
        store.approve(victim.json()["enrollment_id"], "alice")
        racer = await relay.post("/enroll", content=_ask(racer_secret))
        assert racer.status_code == 202 and racer.json()["token"] is None
        victim = await relay.post("/enroll", content=_ask(victim_secret))
        assert victim.status_code == 200 and victim.json()["token"].startswith("ct-")


async def test_the_approval_page_shows_the_fingerprint_the_connector_prints(
    broker: RunningBroker, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    store = broker.server.state.enrollment
    assert store is not None
    settings = ConnectorSettings(
        broker_url=broker.url, llm_url=fake_llm.url, name=NAME, data_dir=tmp_path / "conn"
    )
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(enroll(settings))
        await wait_for(lambda: any(e["event"] == "waiting_for_approval" for e in logs), 10)
    printed = next(e for e in logs if e["event"] == "waiting_for_approval")
    secret = (tmp_path / "conn" / "enrollment-secret").read_text().strip()
    assert fingerprint(secret) in printed["message"]
    async with httpx.AsyncClient(base_url=broker.url + RELAY_PREFIX, timeout=10) as relay:
        racer = await relay.post("/enroll", content=_ask("r" * 48))  # the same name
        assert racer.status_code == 202
    async with httpx.AsyncClient(base_url=broker.url, timeout=15) as operator:
        await login(operator)
        page = (await operator.get("/portal/admin/connectors")).text
        assert fingerprint(secret) in page and fingerprint("r" * 48) in page
        (mine,) = [e for e in store.entries if e.fingerprint == fingerprint(secret)]
        form = {"csrf_token": csrf_of(page), "id": mine.id}
        approved = await operator.post("/portal/admin/enrollments/approve", data=form)
        assert approved.status_code in (200, 303)
    token = await asyncio.wait_for(task, 15)
    assert token is not None and token.startswith("ct-")


async def test_asks_with_fresh_secrets_do_not_rewrite_the_file_unbounded(
    broker: RunningBroker,
) -> None:
    path = broker.settings.enrolled_path
    writes, statuses = 0, []
    last: tuple[int, int] | None = None
    async with httpx.AsyncClient(base_url=broker.url + RELAY_PREFIX, timeout=10) as relay:
        for i in range(3 * enrollment.NEW_PER_ADDRESS):
            r = await relay.post("/enroll", content=_ask(f"{i:02d}" * 24))
            statuses.append(r.status_code)
            stat = path.stat() if path.exists() else None
            stamp = (stat.st_ino, stat.st_mtime_ns) if stat else None
            writes += stamp != last
            last = stamp
        for _ in range(20):  # asking again with a known secret changes nothing
            await relay.post("/enroll", content=_ask("00" * 24))
            stat = path.stat()
            assert (stat.st_ino, stat.st_mtime_ns) == last
    assert writes == enrollment.NEW_PER_ADDRESS
    assert statuses.count(202) == enrollment.NEW_PER_ADDRESS and 429 in statuses
