"""What every /v1 route checks first, with no web framework: request ID, key, JSON body.

Errors are ``ApiError`` (the broker's ``BrokerError``): status, OpenAI-shaped message and
code, and the headers to send; ``broker.errors`` turns it into the answer for the Quart
routes (``broker.api.models``) and the plain-ASGI relay route (``broker.api.relay``) alike.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable

from broker.accounts import key_scope
from broker.accounts.keys import KeyStore, UserKey, bearer
from broker.core.errors import BrokerError
from shared.errors import quote
from shared.protocol import REQUEST_ID_HEADER

_CLIENT_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# The client's x-request-id comes back under this name; x-request-id is the broker's own.
CLIENT_REQUEST_ID_HEADER = "x-client-request-id"


# A /v1 route's refusal: the broker's one error type (``broker.core.errors``).
ApiError = BrokerError


def new_request_id() -> str:
    """The broker's key for a request: a UUID, whatever the client sent.

    A UUID also because llama-cpp-python's server refuses any other x-request-id with a 400.
    """
    return str(uuid.uuid4())


def client_label(header: str | None) -> str | None:
    """The client's own x-request-id when well-formed (a label: logs, ledger, echo), else None.

    A malformed one is dropped, not refused: it names nothing the broker uses, and a
    completion should not fail over a label. The client sees it dropped: no echo comes back.
    """
    if header and _CLIENT_REQUEST_ID_OK.fullmatch(header):
        return header
    return None


def presented_key(authorization: str | None, api_key: str | None, rid: str) -> str | None:
    """The key a request presents: ``Authorization: Bearer <key>`` or ``x-api-key: <key>``.

    Anthropic's clients send ``x-api-key`` (Claude Code with ``ANTHROPIC_API_KEY``),
    OpenAI's and ``ANTHROPIC_AUTH_TOKEN`` a Bearer token; both name one key. Two different
    keys in one request are refused (401): which user would pay is ambiguous, and a proxy
    or library that injects one header must not silently decide it (docs/security.md).
    """
    key = bearer(authorization)
    other = api_key.strip() if api_key else None
    if key is not None and other and other != key:
        raise ApiError(
            401,
            "Two different API keys: 'Authorization: Bearer' and 'x-api-key' must name the "
            "same key, or send only one of them.",
            "conflicting_api_keys",
            headers={REQUEST_ID_HEADER: rid},
        )
    return key if key is not None else (other or None)


def authenticate(
    keys: KeyStore,
    authorization: str | None,
    rid: str,
    api_key: str | None = None,
    clock: Callable[[], float] = time.time,
) -> UserKey:
    """The key's user; ApiError 401 for a missing, wrong, conflicting or expired key, 403
    for a blocked one. ``api_key``: the ``x-api-key`` header, accepted like a Bearer token."""
    headers = {REQUEST_ID_HEADER: rid}
    key = presented_key(authorization, api_key, rid)
    if key is None:
        raise ApiError(
            401,
            "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
            "missing_api_key",
            headers=headers,
        )
    return checked_user(keys, keys.user(key), rid, clock)


def authenticate_hash(
    keys: KeyStore, digest: str, rid: str, clock: Callable[[], float] = time.time
) -> UserKey:
    """Like ``authenticate`` for a key named by its SHA-256: the broker's own in-process
    requests (``INTERNAL_KEY_HASH``), with the same checks."""
    return checked_user(keys, keys.user_by_hash(digest), rid, clock)


def checked_user(
    keys: KeyStore, user: UserKey | None, rid: str, clock: Callable[[], float]
) -> UserKey:
    """``user`` if the key may call now; else ApiError 401 (unknown, expired) or 403."""
    headers = {REQUEST_ID_HEADER: rid}
    if keys.revocations_stale():
        raise ApiError(
            503,
            "The broker cannot check revoked keys right now; try again shortly.",
            "revocations_unavailable",
            headers=headers | {"Retry-After": "2"},
        )
    if user is None:
        raise ApiError(401, "Incorrect API key provided.", "invalid_api_key", headers=headers)
    if user.blocked:
        headers["x-should-retry"] = "false"
        raise ApiError(403, "This API key is blocked.", "key_blocked", headers=headers)
    if key_scope.expired(user.expires, clock()):
        headers["x-should-retry"] = "false"
        raise ApiError(
            401,
            "This API key has expired: regenerate it or create a new one in the key portal, "
            "or ask the operator.",
            "key_expired",
            headers=headers,
        )
    return user


def authorize_model(user: UserKey, model: str, rid: str) -> None:
    """The one check of a key's scope: ApiError 403 ``model_not_allowed`` for a model (or
    alias) the key may not use."""
    if key_scope.allows(user.models, model):
        return
    raise ApiError(
        403,
        f"This API key may not use the model '{quote(model)}'; /v1/models lists those it may.",
        "model_not_allowed",
        type_="invalid_request_error",
        param="model",
        headers={REQUEST_ID_HEADER: rid, "x-should-retry": "false"},
    )


def allowed_models(user: UserKey, names: list[str]) -> list[str]:
    """``names`` that ``user``'s key may use (the model list's filter)."""
    return [n for n in names if key_scope.allows(user.models, n)]
