"""OpenID Connect login: discovery, authorization code with PKCE, a verified ID token.

One ``OidcLogin`` per provider of ``--oidc-providers-file``. authlib builds the grant URI
and the token request as for GitLab (``broker.portal.oauth``, which explains why our own
``httpx`` client sends them); joserfc, authlib's JOSE library, verifies the ID token:

- the discovery document (``<issuer>/.well-known/openid-configuration``) is fetched on the
  first login and kept for an hour; its ``issuer`` must be the configured one;
- the JWKS is kept too and fetched again once when a token names a key it lacks (the
  provider rotated its keys);
- the ID token must be signed with an asymmetric algorithm by one of those keys, name the
  issuer, our client ID in ``aud`` (and in ``azp`` when there are several audiences), be
  within ``exp``/``iat`` (a minute of clock skew allowed), and carry this login's nonce;
- a login's state is accepted once per broker process (``UsedOnce``): the callback
  replayed, with its cookie, is refused before the provider is asked.

The ``sub`` claim is the stable identity (``broker.accounts.identities``);
``preferred_username`` or ``email`` is shown. Allowed groups come from the provider's
``groups_claim`` (a claim name or a dotted path such as ``realm_access.roles``).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from authlib.common.security import generate_token  # type: ignore[import-untyped]
from authlib.oauth2.rfc6749.parameters import (  # type: ignore[import-untyped]
    prepare_grant_uri,
    prepare_token_request,
)
from authlib.oauth2.rfc7636 import create_s256_code_challenge  # type: ignore[import-untyped]
from joserfc import jws, jwt
from joserfc.errors import ExpiredTokenError, InvalidClaimError, JoseError, MissingClaimError
from joserfc.jwk import KeySet

from broker.oidc_providers import OidcProvider
from broker.portal.oauth import (
    CODE_REFUSED,
    NOT_IN_GROUP,
    PROVIDER_DOWN,
    TOKEN_EXPIRED,
    TOKEN_INVALID,
    TOKEN_REPLAYED,
    Flow,
    LoginFailed,
)
from shared.logging import get_logger

log = get_logger("broker.portal.oidc")

DISCOVERY_TTL = 3600.0
LEEWAY = 60  # seconds of clock skew between the broker and the provider
FLOW_TTL = 600.0  # as session.FLOW_MAX_AGE: a state older than this is refused anyway
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]
MAX_NAME = 128


@dataclass(frozen=True, slots=True)
class OidcUser:
    provider: str
    subject: str
    username: str
    name: str
    groups: tuple[str, ...]


@dataclass
class UsedOnce:
    """States already used for a callback, forgotten once their flow cookie has expired."""

    clock: Callable[[], float] = time.monotonic
    seen: dict[str, float] = field(default_factory=dict)

    def first_use(self, state: str) -> bool:
        now = self.clock()
        for old in [s for s, at in self.seen.items() if now - at > FLOW_TTL]:
            del self.seen[old]
        if state in self.seen:
            return False
        self.seen[state] = now
        return True


@dataclass
class _Cached:
    metadata: dict[str, Any]
    keys: KeySet
    fetched: float


class OidcLogin:
    def __init__(
        self,
        provider: OidcProvider,
        *,
        redirect_uri: str,
        http: httpx.AsyncClient,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider = provider
        self.redirect_uri = redirect_uri
        self.http = http
        self.clock = clock
        self.used = UsedOnce(clock)
        self._cache: _Cached | None = None

    @property
    def allowed_groups(self) -> tuple[str, ...]:
        return self.provider.allowed_groups

    async def start(self, next_path: str) -> tuple[str, Flow]:
        """The provider's authorize URL to send the browser to, and the flow to remember."""
        cached = await self._discovered()
        flow = Flow(
            state=generate_token(32),
            verifier=generate_token(64),
            next=next_path,
            nonce=generate_token(32),
            provider=self.provider.name,
        )
        url = prepare_grant_uri(
            cached.metadata["authorization_endpoint"],
            self.provider.client_id,
            response_type="code",
            redirect_uri=self.redirect_uri,
            scope=" ".join(self.provider.scopes),
            state=flow.state,
            nonce=flow.nonce,
            code_challenge=create_s256_code_challenge(flow.verifier),
            code_challenge_method="S256",
        )
        return str(url), flow

    async def finish(self, code: str, flow: Flow) -> OidcUser:
        """Trade the code for tokens, verify the ID token, check the allowed groups."""
        if not self.used.first_use(flow.state):
            raise LoginFailed(TOKEN_REPLAYED, "state used already")
        cached = await self._discovered()
        id_token = await self._token(cached.metadata, code, flow)
        claims = await self._verified(id_token, flow.nonce)
        user = _user(self.provider, claims)
        if self.allowed_groups and not set(self.allowed_groups) & set(user.groups):
            raise LoginFailed(NOT_IN_GROUP, user.username)
        return user

    # -- the provider's documents -----------------------------------------------------------

    async def _discovered(self, *, refresh_keys: bool = False) -> _Cached:
        cached = self._cache
        now = self.clock()
        if cached is not None and now - cached.fetched < DISCOVERY_TTL and not refresh_keys:
            return cached
        url = self.provider.issuer + "/.well-known/openid-configuration"
        metadata = _metadata(await self._get_json(url), self.provider.issuer)
        try:
            jwks = await self._get_json(metadata["jwks_uri"])
            keys = KeySet.import_key_set(jwks)  # type: ignore[arg-type]  # checked inside
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise LoginFailed(PROVIDER_DOWN, "the JWKS holds no usable key") from exc
        self._cache = _Cached(metadata, keys, now)
        return self._cache

    async def _get_json(self, url: str) -> dict[str, Any]:
        response = await self._send("GET", url, headers={"Accept": "application/json"})
        if response.status_code != 200:
            raise LoginFailed(PROVIDER_DOWN, f"{response.status_code} from {url}")
        return _json(response)

    async def _send(self, method: str, url: str, **kw: Any) -> httpx.Response:
        try:
            response = await self.http.request(method, url, **kw)
        except httpx.HTTPError as exc:
            log.warning("oidc_unreachable", provider=self.provider.name, error=type(exc).__name__)
            raise LoginFailed(PROVIDER_DOWN, type(exc).__name__) from exc
        if response.status_code >= 500:
            log.warning("oidc_error", provider=self.provider.name, status=response.status_code)
            raise LoginFailed(PROVIDER_DOWN, f"the provider answered {response.status_code}")
        return response

    # -- the token --------------------------------------------------------------------------

    async def _token(self, metadata: dict[str, Any], code: str, flow: Flow) -> str:
        basic = self.provider.client_secret is not None and _uses_basic(metadata)
        body = prepare_token_request(
            "authorization_code",
            code=code,
            redirect_uri=self.redirect_uri,
            client_id=None if basic else self.provider.client_id,
            client_secret=None if basic else self.provider.client_secret,
            code_verifier=flow.verifier,
        )
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        if basic:
            headers["Authorization"] = _basic(self.provider.client_id, self.provider.client_secret)
        endpoint = metadata["token_endpoint"]
        response = await self._send("POST", endpoint, content=body, headers=headers)
        if 400 <= response.status_code < 500:
            log.info("oidc_code_refused", provider=self.provider.name, status=response.status_code)
            raise LoginFailed(CODE_REFUSED, f"the provider answered {response.status_code}")
        token = _json(response).get("id_token")
        if not isinstance(token, str) or not token:
            raise LoginFailed(PROVIDER_DOWN, "the token answer has no id_token (scope openid?)")
        return token

    async def _verified(self, id_token: str, nonce: str) -> dict[str, Any]:
        cached = await self._discovered()
        if not _has_key(cached.keys, id_token):
            cached = await self._discovered(refresh_keys=True)
        try:
            token = jwt.decode(id_token, cached.keys, algorithms=ALGORITHMS)
            _claims_registry(self.provider, nonce).validate(token.claims)
        except ExpiredTokenError as exc:
            raise LoginFailed(TOKEN_EXPIRED, "exp") from exc
        except (InvalidClaimError, MissingClaimError) as exc:
            claim = str(getattr(exc, "claim", ""))
            kind = TOKEN_REPLAYED if claim == "nonce" else TOKEN_INVALID
            raise LoginFailed(kind, f"claim {claim}") from exc
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise LoginFailed(TOKEN_INVALID, type(exc).__name__) from exc
        claims = dict(token.claims)
        audience = claims.get("aud")
        if isinstance(audience, list) and len(audience) > 1:
            if claims.get("azp") != self.provider.client_id:
                raise LoginFailed(TOKEN_INVALID, "claim azp")
        return claims


def _claims_registry(provider: OidcProvider, nonce: str) -> jwt.JWTClaimsRegistry:
    return jwt.JWTClaimsRegistry(
        leeway=LEEWAY,
        iss={"essential": True, "value": provider.issuer},
        aud={"essential": True, "value": provider.client_id},
        sub={"essential": True},
        exp={"essential": True},
        iat={"essential": True},
        nonce={"essential": True, "value": nonce},
    )


def _uses_basic(metadata: dict[str, Any]) -> bool:
    """HTTP Basic unless the provider lists only client_secret_post (Basic is OIDC's default)."""
    methods = metadata.get("token_endpoint_auth_methods_supported")
    if not isinstance(methods, list):
        return True
    return "client_secret_basic" in methods or "client_secret_post" not in methods


def _basic(client_id: str, secret: str | None) -> str:
    # RFC 6749 2.3.1: both form-urlencoded before base64.
    pair = f"{quote(client_id, safe='')}:{quote(secret or '', safe='')}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


def _has_key(keys: KeySet, id_token: str) -> bool:
    try:
        kid = jws.extract_compact(id_token.encode()).headers().get("kid")
    except (JoseError, ValueError, TypeError):
        return True  # not a JWS at all: decoding says so
    if kid is None:
        return True
    return any(key.kid == kid for key in keys.keys)


def _metadata(data: dict[str, Any], issuer: str) -> dict[str, Any]:
    if str(data.get("issuer", "")).rstrip("/") != issuer:
        raise LoginFailed(PROVIDER_DOWN, "the discovery document names another issuer")
    for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        value = data.get(name)
        if not isinstance(value, str) or not value.startswith(("https://", "http://")):
            raise LoginFailed(PROVIDER_DOWN, f"the discovery document lacks {name}")
    return data


def _user(provider: OidcProvider, claims: dict[str, Any]) -> OidcUser:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not 0 < len(subject) <= 255:
        raise LoginFailed(TOKEN_INVALID, "claim sub")
    username = _text(claims.get("preferred_username")) or _text(claims.get("email")) or subject
    return OidcUser(
        provider=provider.name,
        subject=subject,
        username=username[:MAX_NAME],
        name=(_text(claims.get("name")) or username)[:MAX_NAME],
        groups=groups_of(claims, provider.groups_claim),
    )


def groups_of(claims: dict[str, Any], path: str) -> tuple[str, ...]:
    """The groups (or roles) at ``path``: a claim name, or a dotted path into objects."""
    value: Any = claims
    if path in claims:  # a claim whose name has dots (some providers use URLs)
        value = claims[path]
    else:
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(str(g) for g in value if isinstance(g, str | int))
    return ()


def _text(value: object) -> str:
    if not isinstance(value, str):
        return ""
    return "".join(c for c in value if c.isprintable()).strip()


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError as exc:
        raise LoginFailed(PROVIDER_DOWN, "the answer is not JSON") from exc
    if not isinstance(data, dict):
        raise LoginFailed(PROVIDER_DOWN, "the answer is not a JSON object")
    return data
