"""Security issue 16, item 3: a client-chosen x-request-id used as the broker's key.

The broker keys every request by a UUID it makes; the client's ID is a label (logs, the
usage ledger, ``x-client-request-id``), dropped when malformed. Real broker and connector.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid

import httpx

from shared.bench.upstream import FakeLLM
from tests.support.stack import Stack


def chat(prompt: str = "hi") -> dict[str, object]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": prompt}]}


def is_uuid(value: str) -> bool:
    return str(uuid.UUID(value)) == value


def ledger(stack: Stack) -> list[tuple[str, str | None]]:
    with sqlite3.connect(stack.broker.settings.usage_path) as db:
        rows = db.execute("SELECT request_id, client_request_id FROM usage ORDER BY ts")
        return [(r[0], r[1]) for r in rows]


async def wait_ledger(stack: Stack, n: int) -> list[tuple[str, str | None]]:
    usage = stack.broker.server.state.usage
    assert usage is not None
    for _ in range(200):
        await usage.flush()
        rows = ledger(stack)
        if len(rows) >= n:
            return rows
        await asyncio.sleep(0.05)
    raise AssertionError("the ledger never got the records")


async def test_dot_dot_never_becomes_a_key(stack: Stack, fake_llm: FakeLLM) -> None:
    async with stack.client() as client:
        r = await client.post("/v1/chat/completions", json=chat(), headers={"x-request-id": ".."})
    assert r.status_code == 200, r.text
    assert is_uuid(r.headers["x-request-id"])
    assert r.headers["x-client-request-id"] == ".."


async def test_a_reused_client_id_keys_nothing(stack: Stack, fake_llm: FakeLLM) -> None:
    """Two requests at once with one client ID: two keys, both answered, both labelled."""
    fake_llm.chunk_delay = 0.1
    async with stack.client() as client:
        first, second = await asyncio.gather(
            *(
                client.post("/v1/chat/completions", json=chat(), headers={"x-request-id": "dup-1"})
                for _ in range(2)
            )
        )
    for r in (first, second):
        assert r.status_code == 200, r.text
        assert r.headers["x-client-request-id"] == "dup-1"
    ids = {first.headers["x-request-id"], second.headers["x-request-id"]}
    assert len(ids) == 2 and all(is_uuid(i) for i in ids)
    rows = await wait_ledger(stack, 2)
    assert {(rid, label) for rid, label in rows} == {(i, "dup-1") for i in ids}


async def test_the_model_list_labels_too(stack: Stack) -> None:
    async with stack.client() as client:
        r = await client.get("/v1/models", headers={"x-request-id": "list-7"})
        refused = await client.get(
            "/v1/models", headers={"x-request-id": "list-8", "Authorization": "Bearer nope"}
        )
    assert is_uuid(r.headers["x-request-id"])
    assert r.headers["x-client-request-id"] == "list-7"
    assert refused.status_code == 401
    assert refused.headers["x-client-request-id"] == "list-8"


async def test_errors_before_the_relay_carry_both_ids(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.broker.url) as client:
        r = await client.post(
            "/v1/chat/completions", json=chat(), headers={"x-request-id": "nokey-1"}
        )
    assert r.status_code == 401
    assert is_uuid(r.headers["x-request-id"])
    assert r.headers["x-client-request-id"] == "nokey-1"
