"""The portal over plain HTTP against a real broker, connector and fake LLM: the login flow
and what an attacker would try (state, replayed codes, CSRF, next=, groups, cookies)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import openai
import pytest

from broker.accounts.users import UsersStore
from shared.bench.upstream import FakeLLM
from tests.portal.conftest import portal_settings
from tests.portal.fake_gitlab import FakeGitLab, FakeUser
from tests.portal.helpers import ask, csrf_of, login, new_key_of, portal_client
from tests.support.net import free_port, wait_for
from tests.support.stack import USER_KEY, Stack, start_broker

PAGES = ["/portal/", "/portal/keys", "/portal/playground", "/portal/connect"]


def assert_secure_headers(response: httpx.Response) -> None:
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-frame-options"] == "DENY"


def assert_no_inline_code(html: str) -> None:
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline <script>"
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"\son[a-z]+=", html), "inline event handler"


async def test_first_login_shows_a_working_key_once(
    portal_stack: Stack, fake_gitlab: FakeGitLab
) -> None:
    async with portal_client(portal_stack) as client:
        callback = await login(client)
        assert callback.status_code == 303
        assert callback.headers["location"].startswith("/portal/keys?reveal=")
        page = await client.get(callback.headers["location"])
        key = new_key_of(page.text)
        assert await ask(portal_stack, key) == "tok0 tok1 tok2 tok3 tok4 "
        assert await ask(portal_stack, USER_KEY)  # static --user-api-key keys still work
        again = await client.get(callback.headers["location"])
        assert key not in again.text and key[:9] + "…" in again.text
        users_file = portal_stack.broker.settings.users_path
        assert key not in users_file.read_text() and key[:9] in users_file.read_text()
        # The PKCE verifier went to GitLab's token endpoint, and the code only once.
        assert fake_gitlab.token_requests[0]["code_verifier"]
        # Usage: user and key name on the record; shown per model and day on the page.
        usage = portal_stack.broker.settings.usage_path
        await wait_for(lambda: _rows(usage, "gitlab-1001") >= 1, timeout=10)
        with sqlite3.connect(usage) as db:
            names = {
                r[0]
                for r in db.execute(
                    "SELECT key_name FROM usage WHERE user_id = ?", ("gitlab-1001",)
                )
            }
        assert names == {"default"}
        page = await client.get("/portal/keys")
        assert re.search(r"<code>fake-model</code></td><td class=\"num\">1<", page.text)


def _rows(path: Path, user_id: str) -> int:
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(
            db.execute("SELECT count(*) FROM usage WHERE user_id = ?", (user_id,)).fetchone()[0]
        )


async def test_every_page_has_strict_headers_and_no_inline_script(portal_stack: Stack) -> None:
    async with portal_client(portal_stack) as client:
        for path in ["/", *PAGES, "/portal/callback?state=x&code=y"]:
            r = await client.get(path)
            assert_secure_headers(r)
            if r.status_code < 300 or r.status_code >= 400:
                assert_no_inline_code(r.text)
        await login(client)
        for path in PAGES[1:]:
            r = await client.get(path)
            assert r.status_code == 200, path
            assert_secure_headers(r)
            assert_no_inline_code(r.text)
            assert r.headers["cache-control"] == "no-store"
        playground = await client.get("/portal/playground")
        assert not re.search(r"sk-[0-9a-f]{32}", playground.text)  # no key in the page
        for name in ("portal.js", "playground.js", "markdown.js", "portal.css"):
            r = await client.get(f"/portal/static/{name}")
            assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff"
        assert (await client.get("/portal/static/..%2Fkeys.html.j2")).status_code == 404


async def test_cookie_flags(portal_stack: Stack) -> None:
    async with portal_client(portal_stack) as client:
        start = await client.get("/portal/login")
        flow_cookie = start.headers["set-cookie"]
        consent = await client.get(start.headers["location"])
        callback = await client.get(consent.headers["location"])
        session_cookie = next(
            c for c in callback.headers.get_list("set-cookie") if c.startswith("remotellm_portal=")
        )
    for cookie in (flow_cookie, session_cookie):
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/portal" in cookie
        assert "Secure" not in cookie  # public URL is http here
    assert "Max-Age=43200" in session_cookie


async def test_https_public_url_makes_cookies_secure(
    tmp_path: Path, fake_gitlab: FakeGitLab
) -> None:
    broker = await start_broker(
        tmp_path / "b", **portal_settings(fake_gitlab, public_url="https://llm.example")
    )
    try:
        async with httpx.AsyncClient(base_url=broker.url) as client:
            start = await client.get("/portal/login")
        assert "; Secure" in start.headers["set-cookie"]
        redirect = parse_qs(urlsplit(start.headers["location"]).query)["redirect_uri"]
        assert redirect == ["https://llm.example/portal/callback"]
    finally:
        await broker.stop()


async def test_tampered_or_missing_state_and_a_replayed_code(
    portal_stack: Stack, fake_gitlab: FakeGitLab
) -> None:
    async with portal_client(portal_stack) as client:
        # No login started in this browser: no flow cookie.
        r = await client.get("/portal/callback?code=abc&state=def")
        assert r.status_code == 400 and "expired" in r.text and "Traceback" not in r.text
        # A login started, but the state coming back is not ours.
        start = await client.get("/portal/login")
        consent = await client.get(start.headers["location"])
        back = urlsplit(consent.headers["location"])
        query = parse_qs(back.query)
        forged = {"code": query["code"][0], "state": query["state"][0] + "x"}
        r = await client.get(f"{back.path}?{urlencode(forged)}")
        assert r.status_code == 400 and "expired" in r.text
        assert "remotellm_portal" not in r.headers.get("set-cookie", "")
        # The real answer logs in once...
        start = await client.get("/portal/login")
        consent = await client.get(start.headers["location"])
        good = consent.headers["location"]
        assert (await client.get(good)).status_code == 303
        # ...and replaying the same callback URL does nothing (the flow cookie is gone).
        client.cookies.clear()
        assert (await client.get(good)).status_code == 400
        # Replaying the code inside a new login (its state is right): GitLab refuses the code.
        start = await client.get("/portal/login")
        state = parse_qs(urlsplit(start.headers["location"]).query)["state"][0]
        old_code = parse_qs(urlsplit(good).query)["code"][0]
        r = await client.get(f"/portal/callback?{urlencode({'code': old_code, 'state': state})}")
        assert r.status_code == 400 and "GitLab refused the login" in r.text
        assert "remotellm_portal" not in r.headers.get("set-cookie", "")


async def test_forged_or_missing_csrf_token_changes_nothing(portal_stack: Stack) -> None:
    async with portal_client(portal_stack) as client:
        await login(client)
        page = await client.get("/portal/keys")
        token = csrf_of(page.text)
        users = UsersStore(portal_stack.broker.settings.users_path)
        for form in ({"name": "evil"}, {"name": "evil", "csrf_token": "0" * 64}):
            r = await client.post("/portal/keys", data=form)
            assert r.status_code == 403 and "expired" in r.text
        r = await client.post("/portal/keys/delete", data={"name": "default", "csrf_token": "x"})
        assert r.status_code == 403
        users.reload()
        assert [k.name for k in users.user(1001).keys] == ["default"]  # type: ignore[union-attr]
        # Another login's token does not work for this one.
        async with portal_client(portal_stack) as other:
            await login(other)
            r = await other.post("/portal/keys", data={"name": "evil", "csrf_token": token})
            assert r.status_code == 403
        r = await client.post("/portal/api/playground-key", headers={"X-CSRF-Token": "nope"})
        assert r.status_code == 403
        r = await client.post("/portal/keys", data={"name": "laptop", "csrf_token": token})
        assert r.status_code == 303


@pytest.mark.parametrize(
    "target",
    [
        "https://evil.example/",
        "//evil.example/",
        "/\\evil.example",
        "/portal/../v1/models",
        "https:evil.example",
        "%2F%2Fevil.example",
    ],
)
async def test_next_never_leaves_the_portal(portal_stack: Stack, target: str) -> None:
    async with portal_client(portal_stack) as client:
        await login(client)  # first login: the key is revealed, next= is not used
        client.cookies.clear()
        callback = await login(client, next_path=httpx.QueryParams({"n": target})["n"])
        assert callback.headers["location"] == "/portal/keys"
        r = await client.get("/portal/", params={"next": target})
        assert r.headers["location"] == "/portal/keys"
        client.cookies.clear()
        ok = await login(client, next_path="/portal/playground")
        assert ok.headers["location"] == "/portal/playground"


@pytest.mark.parametrize("portal_overrides", [{"gitlab_allowed_groups": ["acme/llm"]}])
async def test_only_members_of_an_allowed_group_may_log_in(
    portal_stack: Stack, fake_gitlab: FakeGitLab
) -> None:
    async with portal_client(portal_stack) as client:
        r = await login(client)
        assert r.status_code == 403 and "Not allowed here" in r.text
        assert "remotellm_portal=" not in r.headers.get("set-cookie", "")
        assert "openid" in fake_gitlab.authorize_requests[-1]["scope"]
        fake_gitlab.user = FakeUser(2002, "carol", "Carol", ["acme", "acme/llm"])
        r = await login(client)
        assert r.status_code == 303 and "remotellm_portal=" in r.headers["set-cookie"]
    assert UsersStore(portal_stack.broker.settings.users_path).user(1001) is None


async def test_denied_consent_and_gitlab_down_get_pages(
    portal_stack: Stack, fake_gitlab: FakeGitLab
) -> None:
    async with portal_client(portal_stack) as client:
        fake_gitlab.deny = True
        r = await login(client)
        assert r.status_code == 403 and "Login cancelled" in r.text
        fake_gitlab.deny = False
        fake_gitlab.token_status = 503
        r = await login(client)
        assert r.status_code == 502 and "GitLab is not answering" in r.text


async def test_unreachable_gitlab(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    broker = await start_broker(
        tmp_path / "b",
        gitlab_url=dead,
        gitlab_client_id="id",
        gitlab_client_secret="s",
        gitlab_allow_any_user=True,
    )
    try:
        async with httpx.AsyncClient(base_url=broker.url, timeout=15) as client:
            start = await client.get("/portal/login")
            assert start.headers["location"].startswith(dead + "/oauth/authorize?")
            state = parse_qs(urlsplit(start.headers["location"]).query)["state"][0]
            r = await client.get("/portal/callback", params={"code": "c", "state": state})
        assert r.status_code == 502 and "GitLab is not answering" in r.text
        assert_secure_headers(r)
    finally:
        await broker.stop()


async def test_portal_off_without_a_gitlab_app(tmp_path: Path) -> None:
    broker = await start_broker(tmp_path / "b")
    try:
        async with httpx.AsyncClient(base_url=broker.url) as client:
            home = await client.get("/portal/")
            assert home.status_code == 200 and "not set up" in home.text
            r = await client.get("/portal/login")
            assert r.status_code == 503 and "not set up" in r.text
    finally:
        await broker.stop()


async def test_blocked_user_and_a_broken_users_file(portal_stack: Stack, fake_llm: FakeLLM) -> None:
    path = portal_stack.broker.settings.users_path
    async with portal_client(portal_stack) as client:
        key = new_key_of((await client.get((await login(client)).headers["location"])).text)
        UsersStore(path).set_blocked("alice", True)  # what `users block alice` does
        await _until_status(portal_stack, key, 403)
        with pytest.raises(openai.PermissionDeniedError):
            await ask(portal_stack, key)
        r = await client.get("/portal/keys")
        assert r.status_code == 403 and "blocked" in r.text
        UsersStore(path).set_blocked("alice", False)
        await _until_status(portal_stack, key, 200)
        await login(client)  # blocking ended the portal session: log in again
        # The operator breaks the file: keys keep working, changes are refused politely.
        path.write_text("users:\n  - gitlab_id: [\n")
        await asyncio.sleep(2.5)  # one reload period of the broker
        assert await ask(portal_stack, key)
        token = csrf_of((await client.get("/portal/keys")).text)
        r = await client.post("/portal/keys", data={"name": "more", "csrf_token": token})
        assert r.status_code == 503 and "damaged" in r.text
        assert path.read_text() == "users:\n  - gitlab_id: [\n"


async def _until_status(stack: Stack, key: str, status: int) -> None:
    async with httpx.AsyncClient(base_url=stack.broker.url) as client:
        for _ in range(100):
            r = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            if r.status_code == status:
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"key never answered {status}")
