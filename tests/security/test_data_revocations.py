"""Revocations and blocks reach every broker, even one with its own copy of the users file.

Attack: a user whose key was revoked (or who was blocked) on broker A keeps using the key
through broker B, which was deployed with its own copy of the users file. Real processes:
two brokers on one real redis-server, the operator's ``remotellm-broker users`` on A's file.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from broker.accounts.users import UsersStore
from tests.scaleout.conftest import Cluster
from tests.support.procs import Broker, Procs
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e

CHAT = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with RedisServer() as redis:
        c = Cluster(Procs(), redis, tmp_path)
        try:
            yield c
        finally:
            await c.close()


async def status_on(broker: Broker, key: str) -> int:
    async with httpx.AsyncClient(trust_env=False, timeout=10.0) as client:
        r = await client.post(
            f"{broker.url}/v1/chat/completions",
            json=CHAT,
            headers={"Authorization": f"Bearer {key}"},
        )
    return r.status_code


async def wait_status(broker: Broker, key: str, want: int, timeout: float = 10.0) -> float:
    """Seconds until ``key`` gets ``want`` on ``broker``."""
    started = time.monotonic()
    while (got := await status_on(broker, key)) != want:
        assert time.monotonic() - started < timeout, f"still {got}, want {want}"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def users_cli(procs: Procs, data: Path, *args: str) -> None:
    cli = await procs.start("users", "-m", "broker", "--data-dir", str(data), "users", *args)
    assert await cli.wait_exit(30) == 0, cli.tail()


def copies_of_one_users_file(root: Path) -> tuple[str, str]:
    """alice's and bob's keys, in a users file each broker gets its own copy of."""
    a, b = root / "broker0", root / "broker1"
    store = UsersStore(a / "users.yaml")
    alice = store.login(1, "alice", "Alice").first_key
    bob = store.login(2, "bob", "Bob").first_key
    assert alice is not None and bob is not None
    b.mkdir(parents=True)
    shutil.copy2(a / "users.yaml", b / "users.yaml")
    return alice, bob


async def test_revoke_and_block_on_one_broker_reach_the_other(cluster: Cluster) -> None:
    alice, bob = copies_of_one_users_file(cluster.root)
    a, b = await cluster.start(2)
    for key in (alice, bob):
        assert await status_on(b, key) not in (401, 403, 503)

    await users_cli(cluster.procs, a.data_dir, "revoke", "alice", "default")
    await users_cli(cluster.procs, a.data_dir, "block", "bob")
    revoked_after = await wait_status(b, alice, 401)
    blocked_after = await wait_status(b, bob, 403)
    print(f"revocation reached B in {revoked_after:.2f} s, block in {blocked_after:.2f} s")
    assert await status_on(a, alice) == 401 and await status_on(a, bob) == 403

    # Unblocking on A lets bob in on B again (B's own copy never blocked him).
    await users_cli(cluster.procs, a.data_dir, "unblock", "bob")
    await wait_status(b, bob, 404)


async def test_a_broker_started_later_learns_earlier_revocations(cluster: Cluster) -> None:
    alice, _ = copies_of_one_users_file(cluster.root)
    (a,) = await cluster.start(1)
    await users_cli(cluster.procs, a.data_dir, "revoke", "alice", "default")
    await wait_status(a, alice, 401)
    assert a.proc is not None
    await a.proc.wait_event(("revocations_published",), keys=1)
    (b,) = await cluster.start(1)
    assert await status_on(b, alice) == 401
