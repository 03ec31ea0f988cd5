"""A fake OpenID Connect provider on 127.0.0.1 that signs real ID tokens.

- ``GET /.well-known/openid-configuration``: the discovery document (``issuer`` = its URL).
- ``GET /jwks``: the public half of an RSA key generated (with cryptography) at start.
- ``GET /authorize``: approves ``user`` at once (or denies, with ``deny``) and redirects
  back with ``code`` and ``state``; remembers the PKCE challenge and the nonce.
- ``POST /token``: checks client id and secret (HTTP Basic, or the form when
  ``auth_methods`` lists only ``client_secret_post``), redirect URI, the code
  (once only) and the PKCE verifier, then returns an RS256 ID token. ``misbehave`` makes
  the token wrong in one way: ``"wrong_key"`` (signed with another key under the same
  kid), ``"wrong_aud"``, ``"wrong_iss"``, ``"expired"``, ``"replay_nonce"`` (the nonce of
  the first login this provider saw); ``token_status`` makes it fail like a provider down.
- The user's groups sit at ``groups_claim``, a claim name or a dotted path
  (``realm_access.roles`` builds ``{"realm_access": {"roles": [...]}}``).
"""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwt
from joserfc.jwk import RSAKey
from quart import Quart, Response, request

from tests.support.fake_oauth import json_error, json_ok, pkce_matches, redirect_back
from tests.support.loopback import LoopbackApp

CLIENT_ID = "oidc-test-app"
CLIENT_SECRET = "oidc-test-secret"
KID = "fake-1"


def rsa_key(kid: str = KID) -> RSAKey:
    """A fresh 2048-bit RSA key (cryptography) as a JWK."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return RSAKey.import_key(pem, parameters={"kid": kid, "use": "sig", "alg": "RS256"})


@dataclass
class OidcUser:
    sub: str = "u-7f3a"
    preferred_username: str = "bob"
    email: str = "bob@example.org"
    name: str = "Bob B."
    groups: list[str] = field(default_factory=lambda: ["gpu-users"])


@dataclass
class OidcGrant:
    user: OidcUser
    challenge: str
    redirect_uri: str
    nonce: str
    used: bool = False


@dataclass
class FakeOidc(LoopbackApp):
    user: OidcUser = field(default_factory=OidcUser)
    groups_claim: str = "groups"
    misbehave: str | None = None
    token_status: int | None = None
    deny: bool = False
    key: RSAKey = field(default_factory=rsa_key)
    grants: dict[str, OidcGrant] = field(default_factory=dict)
    nonces: list[str] = field(default_factory=list)
    auth_methods: list[str] = field(default_factory=lambda: ["client_secret_basic"])
    client_auth: list[str] = field(default_factory=list)  # "basic" or "post", per request
    discovery_requests: int = 0
    token_requests: int = 0

    def app(self) -> Quart:
        app = Quart("fake-oidc")

        @app.get("/.well-known/openid-configuration")
        async def discovery() -> Response:
            self.discovery_requests += 1
            return json_ok(
                {
                    "issuer": self.url,
                    "authorization_endpoint": f"{self.url}/authorize",
                    "token_endpoint": f"{self.url}/token",
                    "jwks_uri": f"{self.url}/jwks",
                    "response_types_supported": ["code"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256"],
                    "code_challenge_methods_supported": ["S256"],
                    "token_endpoint_auth_methods_supported": self.auth_methods,
                }
            )

        @app.get("/jwks")
        async def jwks() -> Response:
            return json_ok({"keys": [self.key.as_dict(private=False)]})

        @app.get("/authorize")
        async def authorize() -> Response:
            return self._authorize({k: str(v) for k, v in request.args.items()})

        @app.post("/token")
        async def token() -> Response:
            form = {k: str(v) for k, v in (await request.form).items()}
            return self._token(form, request.headers.get("Authorization", ""))

        return app

    def _authorize(self, args: dict[str, str]) -> Response:
        if args.get("client_id") != CLIENT_ID or args.get("response_type") != "code":
            return Response("unknown client", status=400)
        if args.get("code_challenge_method") != "S256" or not args.get("code_challenge"):
            return Response("PKCE required", status=400)
        if "openid" not in args.get("scope", "").split() or not args.get("nonce"):
            return Response("scope openid and a nonce required", status=400)
        back, state = args["redirect_uri"], args.get("state", "")
        if self.deny:
            return redirect_back(back, error="access_denied", state=state)
        code = secrets.token_urlsafe(16)
        self.grants[code] = OidcGrant(self.user, args["code_challenge"], back, args["nonce"])
        self.nonces.append(args["nonce"])
        return redirect_back(back, code=code, state=state)

    def _token(self, form: dict[str, str], authorization: str) -> Response:
        self.token_requests += 1
        if self.token_status is not None:
            return Response("<html>503 Service Unavailable</html>", status=self.token_status)
        self.client_auth.append("basic" if authorization.startswith("Basic ") else "post")
        if _client(form, authorization) != (CLIENT_ID, CLIENT_SECRET):
            return json_error(401, "invalid_client")
        grant = self.grants.get(form.get("code", ""))
        if grant is None or grant.used or form.get("grant_type") != "authorization_code":
            return json_error(400, "invalid_grant")
        grant.used = True
        if form.get("redirect_uri") != grant.redirect_uri:
            return json_error(400, "invalid_grant")
        if not pkce_matches(form.get("code_verifier", ""), grant.challenge):
            return json_error(400, "invalid_grant")
        return json_ok(
            {
                "access_token": secrets.token_urlsafe(24),
                "token_type": "Bearer",
                "expires_in": 3600,
                "id_token": self.id_token(grant),
            }
        )

    def id_token(self, grant: OidcGrant) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.url,
            "sub": grant.user.sub,
            "aud": CLIENT_ID,
            "iat": now,
            "exp": now + 300,
            "nonce": grant.nonce,
            "preferred_username": grant.user.preferred_username,
            "email": grant.user.email,
            "name": grant.user.name,
        }
        _put(claims, self.groups_claim, list(grant.user.groups))
        key = self.key
        if self.misbehave == "wrong_key":
            key = rsa_key(KID)
        elif self.misbehave == "wrong_aud":
            claims["aud"] = "someone-else"
        elif self.misbehave == "wrong_iss":
            claims["iss"] = "https://evil.example"
        elif self.misbehave == "expired":
            claims["iat"], claims["exp"] = now - 3600, now - 600
        elif self.misbehave == "replay_nonce":
            claims["nonce"] = self.nonces[0]
        return jwt.encode({"alg": "RS256", "kid": KID}, claims, key)


def _client(form: dict[str, str], authorization: str) -> tuple[str, str]:
    if authorization.startswith("Basic "):
        user, _, secret = base64.b64decode(authorization[6:]).decode().partition(":")
        return unquote(user), unquote(secret)
    return form.get("client_id", ""), form.get("client_secret", "")


def _put(claims: dict[str, Any], path: str, value: object) -> None:
    *parents, last = path.split(".")
    for part in parents:
        claims = claims.setdefault(part, {})
    claims[last] = value
