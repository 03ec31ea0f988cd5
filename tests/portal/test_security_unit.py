"""Pure checks: next= targets, cookie signatures and expiry, CSRF tokens, GitLab OAuth."""

from __future__ import annotations

import hashlib
from base64 import urlsafe_b64encode
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from itsdangerous import URLSafeTimedSerializer

from broker.portal.csrf import csrf_ok, csrf_token
from broker.portal.oauth import (
    CODE_REFUSED,
    GITLAB_DOWN,
    NOT_IN_GROUP,
    GitLabOAuth,
    LoginFailed,
)
from broker.portal.security import DEFAULT_NEXT, safe_next
from broker.portal.session import Cookies, load_session_secret
from tests.portal.fake_gitlab import CLIENT_ID, CLIENT_SECRET, FakeGitLab, FakeUser


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/portal/playground", "/portal/playground"),
        ("/portal/keys?reveal=x", "/portal/keys?reveal=x"),
        (None, DEFAULT_NEXT),
        ("", DEFAULT_NEXT),
        ("https://evil.example/portal/", DEFAULT_NEXT),
        ("//evil.example/portal/", DEFAULT_NEXT),
        ("/\\evil.example", DEFAULT_NEXT),
        ("\\\\evil.example", DEFAULT_NEXT),
        ("/portal/../v1/models", DEFAULT_NEXT),
        ("/portal/%2e%2e/v1/models", DEFAULT_NEXT),
        ("/portal/%2F%2Fevil.example", DEFAULT_NEXT),
        ("javascript:alert(1)", DEFAULT_NEXT),
        ("/portal/\r\nSet-Cookie: x=1", DEFAULT_NEXT),
        ("/portal/\tfoo", DEFAULT_NEXT),
        ("/v1/models", DEFAULT_NEXT),
        ("/portalx/", DEFAULT_NEXT),
        ("https:/portal/", DEFAULT_NEXT),
        ("/portal/" + "a" * 600, DEFAULT_NEXT),
    ],
)
def test_next_only_stays_inside_the_portal(value: str | None, expected: str) -> None:
    assert safe_next(value) == expected


def test_session_cookie_is_signed_scoped_and_expires() -> None:
    cookies = Cookies("s" * 40, lifetime=3600, secure=True)
    session, spec = cookies.new_session(42, "sid-a")
    assert cookies.session(spec.value) == session
    kw = spec.header_kwargs()
    assert kw["httponly"] and kw["secure"] and kw["samesite"] == "Lax"
    assert kw["path"] == "/portal" and kw["max_age"] == 3600
    assert cookies.session(spec.value[:-2] + "xx") is None
    assert cookies.session(None) is None and cookies.session("garbage") is None
    # Same payload, signed with another secret: refused.
    forged = URLSafeTimedSerializer("t" * 40, salt="remotellm-portal-session").dumps(
        {"u": 42, "s": session.sid}
    )
    assert cookies.session(forged) is None
    # Expired: a lifetime of 0 s refuses anything older than now.
    assert Cookies("s" * 40, lifetime=-1, secure=False).session(spec.value) is None
    # A flow cookie is not a session cookie (different salt).
    _, flow = GitLabOAuth(
        base_url="http://g",
        client_id="c",
        client_secret=None,
        redirect_uri="http://b/portal/callback",
        allowed_groups=[],
        http=httpx.AsyncClient(),
    ).start("/portal/keys")
    assert cookies.session(cookies.flow_cookie(flow).value) is None
    assert cookies.flow(cookies.flow_cookie(flow).value) == flow


def test_csrf_token_is_bound_to_the_login_and_the_secret() -> None:
    cookies = Cookies("s" * 40, lifetime=3600, secure=False)
    one, _ = cookies.new_session(1, "sid-a")
    two, _ = cookies.new_session(1, "sid-b")
    token = csrf_token(cookies.secret, one)
    assert csrf_ok(cookies.secret, one, token)
    assert not csrf_ok(cookies.secret, two, token)
    assert not csrf_ok("other" * 10, one, token)
    assert not csrf_ok(cookies.secret, one, None)
    assert not csrf_ok(cookies.secret, one, "0" * 64)


def test_session_secret_is_generated_once_into_the_data_dir(tmp_path: Path) -> None:
    first = load_session_secret(None, tmp_path)
    assert first == load_session_secret(None, tmp_path)
    assert (tmp_path / "session_secret").stat().st_mode & 0o777 == 0o600
    assert load_session_secret("given", tmp_path) == "given"


def oauth_for(fake: FakeGitLab, groups: list[str], **kw: object) -> GitLabOAuth:
    transport = httpx.ASGITransport(app=fake.app())
    return GitLabOAuth(
        base_url="http://gitlab.test",
        client_id=CLIENT_ID,
        client_secret=str(kw.get("secret", CLIENT_SECRET)),
        redirect_uri="http://broker.test/portal/callback",
        allowed_groups=groups,
        http=httpx.AsyncClient(transport=transport),
    )


async def authorize(oauth: GitLabOAuth, url: str) -> str:
    answer = await oauth.http.get(url)
    assert answer.status_code == 302, answer.text
    query = parse_qs(urlsplit(answer.headers["location"]).query)
    return query["code"][0]


async def test_pkce_flow_with_authlib_parameters() -> None:
    fake = FakeGitLab(user=FakeUser(5, "bob", "Bob", ["acme/team"]))
    oauth = oauth_for(fake, ["acme/team"])
    url, flow = oauth.start("/portal/keys")
    query = parse_qs(urlsplit(url).query)
    assert query["code_challenge_method"] == ["S256"]
    digest = hashlib.sha256(flow.verifier.encode()).digest()
    assert query["code_challenge"] == [urlsafe_b64encode(digest).rstrip(b"=").decode()]
    assert query["scope"] == ["read_user openid"]
    assert query["state"] == [flow.state] and len(flow.state) >= 32
    code = await authorize(oauth, url)
    user = await oauth.finish(code, flow)
    assert (user.id, user.username, user.groups) == (5, "bob", ("acme/team",))
    with pytest.raises(LoginFailed) as replay:  # a code works once
        await oauth.finish(code, flow)
    assert replay.value.kind == CODE_REFUSED
    await oauth.http.aclose()


async def test_wrong_verifier_group_and_gitlab_errors_are_told_apart() -> None:
    fake = FakeGitLab(user=FakeUser(5, "bob", "Bob", ["other"]))
    oauth = oauth_for(fake, ["acme"])
    url, flow = oauth.start("/portal/keys")
    code = await authorize(oauth, url)
    _, other_flow = oauth.start("/portal/keys")
    with pytest.raises(LoginFailed) as wrong:
        await oauth.finish(code, other_flow)  # PKCE verifier of another login
    assert wrong.value.kind == CODE_REFUSED
    url, flow = oauth.start("/portal/keys")
    with pytest.raises(LoginFailed) as outside:
        await oauth.finish(await authorize(oauth, url), flow)
    assert outside.value.kind == NOT_IN_GROUP
    fake.token_status = 502
    url, flow = oauth.start("/portal/keys")
    with pytest.raises(LoginFailed) as down:
        await oauth.finish(await authorize(oauth, url), flow)
    assert down.value.kind == GITLAB_DOWN
    await oauth.http.aclose()
