"""A small fake GitLab OAuth provider on 127.0.0.1 (the portal tests' only mock).

- ``GET /oauth/authorize``: consents at once (or denies, with ``deny = True``) and redirects
  back with ``code`` and ``state``; remembers the PKCE challenge with the code.
- ``POST /oauth/token``: checks client id and secret, redirect URI, the code (once only)
  and the PKCE verifier (S256); ``token_status`` makes it fail like a GitLab that is down.
  ``grant_type=refresh_token`` trades a refresh token (once) for new tokens.
- ``GET /api/v4/user``, ``GET /oauth/userinfo`` (with ``groups``) and ``GET /api/v4/groups``.
- ``expire_access_tokens()`` makes every access token answer 401, as GitLab's do after 2 h.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from quart import Quart, Response, request

from tests.support.fake_oauth import json_error, json_ok, pkce_matches, redirect_back
from tests.support.loopback import LoopbackApp

CLIENT_ID = "portal-test-app"
CLIENT_SECRET = "portal-test-secret"


@dataclass
class FakeUser:
    id: int
    username: str
    name: str = ""
    groups: list[str] = field(default_factory=list)


@dataclass
class Grant:
    user: FakeUser
    challenge: str
    redirect_uri: str
    used: bool = False


@dataclass
class FakeGitLab(LoopbackApp):
    user: FakeUser = field(default_factory=lambda: FakeUser(1001, "alice", "Alice A.", ["team"]))
    deny: bool = False
    token_status: int | None = None
    grants: dict[str, Grant] = field(default_factory=dict)
    tokens: dict[str, FakeUser] = field(default_factory=dict)
    refresh_tokens: dict[str, FakeUser] = field(default_factory=dict)
    userinfo_requests: int = 0
    token_requests: list[dict[str, str]] = field(default_factory=list)
    authorize_requests: list[dict[str, str]] = field(default_factory=list)

    def app(self) -> Quart:
        app = Quart("fake-gitlab")

        @app.get("/oauth/authorize")
        async def authorize() -> Response:
            args = {k: str(v) for k, v in request.args.items()}
            self.authorize_requests.append(args)
            if args.get("client_id") != CLIENT_ID or args.get("response_type") != "code":
                return Response("unknown client", status=400)
            if args.get("code_challenge_method") != "S256" or not args.get("code_challenge"):
                return Response("PKCE required", status=400)
            back = args["redirect_uri"]
            if self.deny:
                return redirect_back(back, error="access_denied", state=args.get("state", ""))
            code = secrets.token_urlsafe(16)
            self.grants[code] = Grant(self.user, args["code_challenge"], back)
            return redirect_back(back, code=code, state=args.get("state", ""))

        @app.post("/oauth/token")
        async def token() -> Response:
            form = {k: str(v) for k, v in (await request.form).items()}
            self.token_requests.append(form)
            if self.token_status is not None:
                return Response("<html>502 Bad Gateway</html>", status=self.token_status)
            if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
                return json_error(401, "invalid_client")
            if form.get("grant_type") == "refresh_token":
                owner = self.refresh_tokens.pop(form.get("refresh_token", ""), None)
                return json_error(400, "invalid_grant") if owner is None else self._issue(owner)
            grant = self.grants.get(form.get("code", ""))
            if grant is None or grant.used or form.get("grant_type") != "authorization_code":
                return json_error(400, "invalid_grant")
            grant.used = True
            if form.get("redirect_uri") != grant.redirect_uri:
                return json_error(400, "invalid_grant")
            if not pkce_matches(form.get("code_verifier", ""), grant.challenge):
                return json_error(400, "invalid_grant")
            return self._issue(grant.user)

        def who() -> FakeUser | None:
            auth = request.headers.get("Authorization", "")
            return self.tokens.get(auth.removeprefix("Bearer ").strip())

        @app.get("/api/v4/user")
        async def user() -> Response:
            u = who()
            if u is None:
                return json_error(401, "invalid_token")
            return json_ok({"id": u.id, "username": u.username, "name": u.name, "state": "active"})

        @app.get("/oauth/userinfo")
        async def userinfo() -> Response:
            self.userinfo_requests += 1
            u = who()
            if u is None:
                return json_error(401, "invalid_token")
            return json_ok({"sub": str(u.id), "nickname": u.username, "groups": u.groups})

        @app.get("/api/v4/groups")
        async def groups() -> Response:
            u = who()
            if u is None:
                return json_error(401, "invalid_token")
            return json_ok([{"full_path": g} for g in u.groups])

        return app

    def _issue(self, user: FakeUser) -> Response:
        access, refresh = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        self.tokens[access] = user
        self.refresh_tokens[refresh] = user
        body = {
            "access_token": access,
            "refresh_token": refresh,
            "token_type": "Bearer",
            "expires_in": 7200,
        }
        return json_ok(body)

    def expire_access_tokens(self) -> None:
        self.tokens.clear()
