"""Two broker processes on one Redis: each writes the changes made through it to its own
audit table, and ``remotellm-broker audit --db A --db B`` merges them in time order."""

from __future__ import annotations

import asyncio
import json
import shutil

from tests.scaleout.conftest import Cluster
from tests.support.admin import admin_client, cli, create_token, seed_users


async def test_each_broker_audits_its_own_changes_and_the_cli_merges_them(
    cluster: Cluster,
) -> None:
    users = cluster.root / "users.yaml"
    seed_users(users, (42, "alice"), (7, "bob"))
    first, second = cluster.root / "broker0", cluster.root / "broker1"
    token = await create_token(first, "write", "ops")  # audited in broker0's database
    second.mkdir(mode=0o700)
    shutil.copy2(first / "admin_tokens.yaml", second / "admin_tokens.yaml")
    brokers = await cluster.start(2, "--users-file", str(users))
    steps = [(brokers[0], "block"), (brokers[1], "unblock"), (brokers[0], "block")]
    for broker, verb in steps:
        async with admin_client(broker.url, token) as admin:
            r = await admin.post(f"/users/bob/{verb}")
            assert r.status_code == 200, r.text
            assert r.json()["blocked"] is (verb == "block")

    dbs = [str(d / "usage.sqlite3") for d in (first, second)]
    done = await asyncio.to_thread(
        cli, first, "audit", "--format", "json", "--db", dbs[0], "--db", dbs[1]
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)["entries"]
    assert [e["action"] for e in found] == [
        "admin_token.create",
        "user.block",
        "user.unblock",
        "user.block",
    ]
    assert [e["ts"] for e in found] == sorted(e["ts"] for e in found)
    alone = await asyncio.to_thread(cli, second, "audit", "--format", "json")
    assert [e["action"] for e in json.loads(alone.stdout)["entries"]] == ["user.unblock"]
