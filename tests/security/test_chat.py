"""The chat's API (/portal/api/conversations) under attack: no or a wrong CSRF token,
malformed and oversized bodies, IDs that are unknown, malformed or another user's, hostile
titles. A real broker, connector and fake LLM; two users logged in over plain HTTP.

Another user's conversation must answer exactly like one that never existed (404, the same
body), on every route, and leave the owner's conversation as it was.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from broker.usage.query import UsageFilter, totals
from shared.bench.upstream import FakeLLM
from tests.portal.conftest import fake_gitlab, portal_stack
from tests.portal.fake_gitlab import FakeGitLab, FakeUser
from tests.portal.helpers import csrf_of, login, portal_client
from tests.support.net import wait_for
from tests.support.stack import Stack

__all__ = ["fake_gitlab", "portal_stack"]

API = "/portal/api/conversations"
BOB = FakeUser(2002, "bob", "Bob B.", ["team"])


@pytest.fixture
def portal_overrides() -> dict[str, object]:
    return {"admin_ids": [1001]}  # alice is the operator: she may see counts, never content


@dataclass
class Caller:
    http: httpx.AsyncClient
    csrf: str

    async def post(self, path: str, body: object, csrf: str | None = "") -> httpx.Response:
        token = self.csrf if csrf == "" else csrf
        headers = {"X-CSRF-Token": token} if token is not None else {}
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.http.post(
            path, content=content, headers=headers | {"Content-Type": "application/json"}
        )


async def logged_in(stack: Stack) -> Caller:
    http = portal_client(stack)
    await login(http)
    page = await http.get("/portal/chat")
    assert page.status_code == 200, page.text
    return Caller(http, csrf_of(page.text))


@pytest.fixture
async def callers(
    portal_stack: Stack, fake_gitlab: FakeGitLab
) -> AsyncIterator[tuple[Caller, Caller]]:
    alice = await logged_in(portal_stack)
    fake_gitlab.user = BOB
    bob = await logged_in(portal_stack)
    yield alice, bob
    await alice.http.aclose()
    await bob.http.aclose()


async def talk(caller: Caller, cid: str, content: str) -> list[dict[str, object]]:
    """Send a message; the NDJSON events of the answer."""
    answer = await caller.post(f"{API}/{cid}/messages", {"content": content, "model": "fake-model"})
    assert answer.status_code == 200, answer.text
    return [json.loads(line) for line in answer.text.splitlines() if line]


async def test_bad_input_is_refused_with_a_clear_error(callers: tuple[Caller, Caller]) -> None:
    alice, _ = callers
    # No token, a wrong token: refused before anything is stored.
    assert (await alice.post(API, {"model": "fake-model"}, csrf=None)).status_code == 403
    wrong = await alice.post(API, {"model": "fake-model"}, csrf="0" * 64)
    assert wrong.status_code == 403
    assert wrong.json() == {"error": "bad CSRF token; reload the page"}
    # Malformed bodies.
    assert (await alice.post(API, b"{not json")).status_code == 400
    assert (await alice.post(API, b"\xff\xfe")).status_code == 400
    assert (await alice.post(API, [1, 2])).status_code == 400
    assert (await alice.post(API, {"model": 5})).status_code == 400
    made = await alice.post(API, {"model": "fake-model", "title": "plans"})
    assert made.status_code == 201, made.text
    cid = made.json()["conversation"]["id"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cid)  # 128 random bits
    # Oversized: one message over the chat's bound, a body over the portal's form bound.
    big = await alice.post(
        f"{API}/{cid}/messages", {"content": "x" * 32_001, "model": "fake-model"}
    )
    assert big.status_code == 413
    assert "too long" in big.json()["error"]
    huge = await alice.post(f"{API}/{cid}/messages", {"content": "x" * 70_000, "model": "m"})
    assert huge.status_code == 413
    bad_model = await alice.post(f"{API}/{cid}/messages", {"content": "hi", "model": "a b\n"})
    assert bad_model.status_code == 400
    # Unknown and malformed IDs: 404, nothing else.
    for path in ("A" * 22, "../../etc/passwd", "x" * 5000, "%00", "' OR 1=1 --"):
        got = await alice.http.get(f"{API}/{path}")
        assert got.status_code == 404, (path, got.status_code)
    # Bad message ids to clone from, a bad export format, delete-all without its confirmation.
    for message in ("1; DROP TABLE messages", -1, True, 2**70, None):
        got = await alice.post(f"{API}/{cid}/clone", {"message": message})
        assert got.status_code == 400, (message, got.text)
    assert (await alice.post(f"{API}/{cid}/clone", {"message": 999999})).status_code == 404
    assert (await alice.http.get(f"{API}/{cid}/export?format=exe")).status_code == 400
    assert (await alice.post(f"{API}/delete-all", {})).status_code == 400
    assert (await alice.http.get(API)).json()["conversations"][0]["id"] == cid
    # Not logged in at all.
    async with httpx.AsyncClient(base_url=str(alice.http.base_url)) as stranger:
        assert (await stranger.get(API)).status_code == 401


async def test_hostile_titles_are_kept_as_plain_one_line_text(
    callers: tuple[Caller, Caller],
) -> None:
    alice, _ = callers
    hostile = '<script>alert(1)</script>\u202e\u200bgnp.exe\n\r\t"quoted" ' + "x" * 2000
    made = await alice.post(API, {"model": "fake-model", "title": "t"})
    cid = made.json()["conversation"]["id"]
    too_long = await alice.post(f"{API}/{cid}/rename", {"title": hostile + "y" * 1000})
    assert too_long.status_code == 413
    renamed = await alice.post(f"{API}/{cid}/rename", {"title": hostile[:900]})
    title = renamed.json()["conversation"]["title"]
    assert title.startswith('<script>alert(1)</script>gnp.exe "quoted" x')  # text, no controls
    assert len(title) <= 120
    assert not any(c in title for c in "\u202e\u200b\n\r\t")
    page = await alice.http.get(f"/portal/chat/{cid}")
    assert "<script>alert(1)" not in page.text  # the page fills titles in with textContent
    md = await alice.http.get(f"{API}/{cid}/export?format=md")
    assert md.headers["cache-control"] == "no-store"
    assert "default-src 'none'" in md.headers["content-security-policy"]
    assert re.fullmatch(
        r'attachment; filename="[A-Za-z0-9-]+\.md"', md.headers["content-disposition"]
    )


async def test_the_operator_sees_counts_and_no_log_line_holds_content(
    callers: tuple[Caller, Caller], capfd: pytest.CaptureFixture[str]
) -> None:
    alice, bob = callers
    made = await bob.post(API, {"model": "fake-model", "title": "bob's diary"})
    cid = made.json()["conversation"]["id"]
    await talk(bob, cid, "my secret diary entry")
    page = await alice.http.get("/portal/admin/users")
    assert page.status_code == 200
    row = re.search(r'<tr data-user="bob">.*?</tr>', page.text, re.S)
    assert row is not None and "1 conversations" in row.group(0) and "2 messages" in row.group(0)
    assert "diary" not in page.text
    assert (await alice.http.get(f"{API}/{cid}")).status_code == 404  # an admin too
    captured = capfd.readouterr()
    logged = captured.out + captured.err  # console or JSON lines, as logging was set up
    assert "portal_key_changed" in logged  # the broker's log is here (the chat key made)...
    assert "diary" not in logged  # ...and holds no title or message


async def test_another_users_conversation_answers_like_an_unknown_one(
    callers: tuple[Caller, Caller], portal_stack: Stack
) -> None:
    alice, bob = callers
    made = await alice.post(API, {"model": "fake-model", "title": "alice's secret plans"})
    cid = made.json()["conversation"]["id"]
    events = await talk(alice, cid, "the secret is 42")
    assert events[-1]["end"]["state"] == "done"  # type: ignore[index]
    unknown = "B" * 22
    for target in (cid, unknown):
        answers = [
            await bob.http.get(f"{API}/{target}"),
            await bob.http.get(f"{API}/{target}/export?format=json"),
            await bob.post(f"{API}/{target}/rename", {"title": "mine now"}),
            await bob.post(f"{API}/{target}/delete", {}),
            await bob.post(f"{API}/{target}/restore", {}),
            await bob.post(f"{API}/{target}/clone", {"message": 1}),
            await bob.post(f"{API}/{target}/stop", {}),
            await bob.post(f"{API}/{target}/messages", {"content": "hi", "model": "fake-model"}),
        ]
        assert [a.status_code for a in answers] == [404] * len(answers), target
        page = await bob.http.get(f"/portal/chat/{target}")
        assert page.status_code == 404
        assert "secret" not in page.text
    # The same bodies for both: nothing tells a real ID from a made-up one.
    mine = await bob.http.get(f"{API}/{cid}")
    made_up = await bob.http.get(f"{API}/{unknown}")
    assert mine.content == made_up.content
    assert (await bob.http.get(API)).json() == {"conversations": []}
    assert (await bob.post(f"{API}/delete-all", {"confirm": "delete all"})).json() == {"deleted": 0}
    # Alice's conversation is as she left it.
    mine_still = (await alice.http.get(f"{API}/{cid}")).json()
    assert mine_still["conversation"]["title"] == "alice's secret plans"
    assert mine_still["messages"][0]["content"] == "the secret is 42"


async def test_a_reply_counts_like_api_use_and_content_stays_out_of_the_ledger(
    callers: tuple[Caller, Caller], portal_stack: Stack
) -> None:
    alice, _ = callers
    made = await alice.post(API, {"model": "fake-model", "title": "count me"})
    cid = made.json()["conversation"]["id"]
    events = await talk(alice, cid, "a private question")
    end = events[-1]["end"]
    assert end["state"] == "done" and end["tokens_out"] == 5, end  # type: ignore[index]
    usage = portal_stack.broker.settings.usage_path

    def recorded() -> list[str | None]:
        with sqlite3.connect(usage) as db:
            return [
                r[0]
                for r in db.execute(
                    "SELECT key_name FROM usage WHERE user_id = ?", ("gitlab-1001",)
                )
            ]

    await wait_for(lambda: bool(recorded()), 10)
    assert recorded() == ["chat"]  # the user's chat key: their limits and their ledger
    rows = await asyncio.to_thread(totals, usage, UsageFilter(user="gitlab-1001"), "day", None)
    assert rows[0].tokens_out == 5
    raw = usage.read_bytes() + usage.with_name(usage.name + "-wal").read_bytes()
    assert b"a private question" not in raw


async def _long_reply(
    alice: Caller, fake_llm: FakeLLM, title: str
) -> tuple[str, str, dict[str, str]]:
    """A new conversation and the body and headers of a message whose reply streams for
    seconds (400 tokens 50 ms apart)."""
    made = await alice.post(API, {"model": "fake-model", "title": title})
    fake_llm.chunk_delay = 0.05
    body = json.dumps({"content": "tokens:400", "model": "fake-model"})
    headers = {"X-CSRF-Token": alice.csrf, "Content-Type": "application/json"}
    return made.json()["conversation"]["id"], body, headers


async def test_one_reply_at_a_time_and_stop_cancels_the_upstream(
    callers: tuple[Caller, Caller], fake_llm: FakeLLM
) -> None:
    alice, _ = callers
    cid, body, headers = await _long_reply(alice, fake_llm, "long one")
    path = f"{API}/{cid}/messages"
    async with alice.http.stream("POST", path, content=body, headers=headers) as answer:
        lines = answer.aiter_lines()
        assert "user" in json.loads(await anext(lines))
        assert "delta" in json.loads(await anext(lines))  # streaming now
        # A second message (or a flood of them) while it streams: refused, nothing saved.
        again = await asyncio.gather(
            *(alice.post(path, {"content": "more", "model": "fake-model"}) for _ in range(5))
        )
        assert [a.status_code for a in again] == [409] * 5
        assert (await alice.post(f"{API}/{cid}/stop", {})).json() == {"stopped": True}
        events = [json.loads(line) async for line in lines if line]
    assert events[-1]["end"]["state"] == "stopped"
    await wait_for(lambda: fake_llm.disconnects >= 1, 10)  # the upstream call was closed
    saved = (await alice.http.get(f"{API}/{cid}")).json()
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    reply = saved["messages"][1]
    assert reply["state"] == "stopped" and reply["content"].startswith("tok0 ")
    assert saved["busy"] is False


async def test_a_dropped_connection_leaves_the_partial_reply_saved_as_stopped(
    callers: tuple[Caller, Caller], fake_llm: FakeLLM
) -> None:
    alice, _ = callers
    cid, body, headers = await _long_reply(alice, fake_llm, "on a train")
    async with httpx.AsyncClient(base_url=str(alice.http.base_url)) as phone:
        phone.cookies = alice.http.cookies
        async with phone.stream(
            "POST", f"{API}/{cid}/messages", content=body, headers=headers
        ) as a:
            lines = a.aiter_lines()
            await anext(lines)
            await anext(lines)  # a piece of the reply arrived; then the network goes
    # The connection is closed: the broker stops the reply and cancels the upstream.
    saved: dict[str, object] = {}

    async def settled() -> bool:
        saved.update((await alice.http.get(f"{API}/{cid}")).json())
        return saved["busy"] is False

    for _ in range(100):
        if await settled():
            break
        await asyncio.sleep(0.1)
    reply = saved["messages"][1]  # type: ignore[index]
    assert reply["state"] == "stopped" and reply["content"].startswith("tok0 "), reply
    assert "tok399" not in reply["content"]
    await wait_for(lambda: fake_llm.disconnects >= 1, 10)
