"""GitLab login: OAuth 2 authorization code with PKCE (S256), then who the user is.

authlib builds and checks the protocol messages (grant URI, token request, PKCE
challenge, state tokens); the HTTP goes through our own ``httpx.AsyncClient``. We do not
use ``authlib.integrations.httpx_client``: since authlib 1.8 it imports httpx2 when that is
installed and otherwise warns that plain httpx is deprecated. In this project httpx2 is
present only as a dev dependency (the openai SDK pulls it in), so that integration would
run on httpx2 in the tests, on httpx in production with a deprecation warning at every
start, and outside respx/MockTransport either way. With the protocol core and our own
client there is one HTTP stack, no warning, and the switch to httpx2 stays one import.

Group membership: GitLab's ``/api/v4/groups`` needs the broad ``read_api`` scope, so when
``--gitlab-allowed-group`` is set we also ask for ``openid`` and read the ``groups`` claim
of ``/oauth/userinfo`` (full paths of every group the user belongs to, directly or through
an ancestor). Without allowed groups the scope is ``read_user`` alone. The tokens stay with
the server-side session so membership is checked again while the user stays logged in
(``recheck``); an expired access token is renewed with the refresh token first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from broker.state.portal_sessions import GitLabTokens
from shared.logging import get_logger

# authlib and httpx load with the first GitLab call: a broker without a GitLab application
# (the portal off) never imports them, though the portal's pages still answer.
if TYPE_CHECKING:
    import httpx

log = get_logger("broker.portal.oauth")


class LoginFailed(Exception):
    """A login that cannot complete; ``kind`` picks the page that explains it."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


# kinds of LoginFailed
GITLAB_DOWN = "gitlab_down"
PROVIDER_DOWN = GITLAB_DOWN  # the same page, naming the provider
DENIED = "denied"
STATE_MISMATCH = "state_mismatch"
CODE_REFUSED = "code_refused"
NOT_IN_GROUP = "not_in_group"
TOKEN_INVALID = "token_invalid"  # OIDC: bad signature, issuer or audience
TOKEN_EXPIRED = "token_expired"  # OIDC: the ID token's exp is past
TOKEN_REPLAYED = "token_replayed"  # OIDC: a nonce or state used already
IDENTITY_CLASH = "identity_clash"  # two identities hash to one user ID


@dataclass(frozen=True, slots=True)
class Flow:
    """What the browser carries (signed) from /portal/login to /portal/callback."""

    state: str
    verifier: str
    next: str
    nonce: str = ""  # OpenID Connect only (broker.portal.oidc)
    provider: str = ""  # the OIDC provider's name; "" for GitLab


@dataclass(frozen=True, slots=True)
class GitLabUser:
    id: int
    username: str
    name: str
    groups: tuple[str, ...]
    tokens: GitLabTokens | None = None


class GitLabOAuth:
    def __init__(
        self,
        *,
        base_url: str,
        client_id: str,
        client_secret: str | None,
        redirect_uri: str,
        allowed_groups: list[str],
        http: httpx.AsyncClient,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uri = redirect_uri
        self.allowed_groups = [g.strip("/").lower() for g in allowed_groups]
        self.scope = "read_user openid" if self.allowed_groups else "read_user"
        self.http = http

    def start(self, next_path: str) -> tuple[str, Flow]:
        """The GitLab authorize URL to send the browser to, and the flow to remember."""
        from authlib.common.security import generate_token  # type: ignore[import-untyped]
        from authlib.oauth2.rfc6749.parameters import (  # type: ignore[import-untyped]
            prepare_grant_uri,
        )
        from authlib.oauth2.rfc7636 import (  # type: ignore[import-untyped]
            create_s256_code_challenge,
        )

        flow = Flow(state=generate_token(32), verifier=generate_token(64), next=next_path)
        url = prepare_grant_uri(
            f"{self.base_url}/oauth/authorize",
            self.client_id,
            response_type="code",
            redirect_uri=self.redirect_uri,
            scope=self.scope,
            state=flow.state,
            code_challenge=create_s256_code_challenge(flow.verifier),
            code_challenge_method="S256",
        )
        return str(url), flow

    async def finish(self, code: str, flow: Flow) -> GitLabUser:
        """Trade the code for a token, read the user, check the allowed groups."""
        tokens = await self._token(code, flow)
        token = tokens.access
        profile = await self._get("/api/v4/user", token)
        groups: tuple[str, ...] = ()
        if self.allowed_groups:
            groups = _groups(await self._get("/oauth/userinfo", token))
        try:
            user = GitLabUser(
                id=int(profile["id"]),
                username=str(profile["username"]),
                name=str(profile.get("name") or profile["username"]),
                groups=groups,
                tokens=tokens,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LoginFailed(
                GITLAB_DOWN, "GitLab's /api/v4/user answer lacks id/username"
            ) from exc
        if self.allowed_groups and not self.in_allowed_group(user):
            raise LoginFailed(NOT_IN_GROUP, user.username)
        return user

    def in_allowed_group(self, user: GitLabUser) -> bool:
        return self._allowed(user.groups)

    def _allowed(self, groups: tuple[str, ...]) -> bool:
        mine = {g.strip("/").lower() for g in groups}
        return any(g in mine for g in self.allowed_groups)

    async def recheck(self, tokens: GitLabTokens) -> tuple[bool, GitLabTokens]:
        """Is the token's user still in an allowed group? With the tokens to keep.

        False when GitLab refuses the tokens (revoked, or the refresh token too is spent)
        or the groups no longer match; LoginFailed(GITLAB_DOWN) when GitLab cannot answer.
        """
        response = await self._send("GET", "/oauth/userinfo", headers=_bearer(tokens.access))
        if response.status_code == 401 and tokens.refresh:
            try:
                tokens = await self._refresh(tokens.refresh)
            except LoginFailed as exc:
                if exc.kind == GITLAB_DOWN:
                    raise
                return False, tokens
            response = await self._send("GET", "/oauth/userinfo", headers=_bearer(tokens.access))
        if 400 <= response.status_code < 500:
            return False, tokens
        if response.status_code != 200:
            raise LoginFailed(GITLAB_DOWN, f"GitLab answered {response.status_code}")
        return self._allowed(_groups(_json(response))), tokens

    async def _refresh(self, refresh: str) -> GitLabTokens:
        body = _token_body(
            "refresh_token",
            refresh_token=refresh,
            redirect_uri=self.redirect_uri,
            client_id=self.client_id,
            client_secret=self.client_secret,
        )
        return await self._token_request(body)

    async def _token(self, code: str, flow: Flow) -> GitLabTokens:
        body = _token_body(
            "authorization_code",
            code=code,
            redirect_uri=self.redirect_uri,
            client_id=self.client_id,
            client_secret=self.client_secret,
            code_verifier=flow.verifier,
        )
        return await self._token_request(body)

    async def _token_request(self, body: str) -> GitLabTokens:
        response = await self._send(
            "POST",
            "/oauth/token",
            content=body,
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Accept": "application/json",
            },
        )
        if 400 <= response.status_code < 500:
            # invalid_grant: a used, expired or forged code, or a wrong PKCE verifier.
            log.info("oauth_code_refused", status=response.status_code)
            raise LoginFailed(CODE_REFUSED, f"GitLab answered {response.status_code}")
        data = _json(response)
        token = data.get("access_token")
        if not isinstance(token, str) or not token:
            raise LoginFailed(GITLAB_DOWN, "GitLab's token answer has no access_token")
        refresh = data.get("refresh_token")
        return GitLabTokens(token, refresh if isinstance(refresh, str) else "")

    async def _get(self, path: str, token: str) -> dict[str, Any]:
        response = await self._send("GET", path, headers=_bearer(token))
        if response.status_code != 200:
            raise LoginFailed(GITLAB_DOWN, f"GitLab answered {response.status_code} on {path}")
        return _json(response)

    async def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        import httpx

        try:
            response = await self.http.request(method, self.base_url + path, **kw)
        except httpx.HTTPError as exc:
            log.warning("gitlab_unreachable", path=path, error_type=type(exc).__name__)
            raise LoginFailed(GITLAB_DOWN, type(exc).__name__) from exc
        if response.status_code >= 500:
            log.warning("gitlab_error", path=path, status=response.status_code)
            raise LoginFailed(GITLAB_DOWN, f"GitLab answered {response.status_code}")
        return response


def _token_body(grant_type: str, **fields: str | None) -> str:
    from authlib.oauth2.rfc6749.parameters import prepare_token_request

    return str(prepare_token_request(grant_type, **fields))


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _groups(info: dict[str, Any]) -> tuple[str, ...]:
    raw = info.get("groups")
    return tuple(str(g) for g in raw) if isinstance(raw, list) else ()


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError as exc:
        raise LoginFailed(GITLAB_DOWN, "GitLab's answer is not JSON") from exc
    if not isinstance(data, dict):
        raise LoginFailed(GITLAB_DOWN, "GitLab's answer is not a JSON object")
    return data
