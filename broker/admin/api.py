"""The admin API's plumbing: its route table, admin-token authorisation, bodies, replies.

Every route under ``/admin/v1`` is declared with ``route`` (method, path, scope, summary,
body model, query parameters); that one table registers the Quart rule and feeds the
OpenAPI document (``broker.admin.openapi``), so the two cannot differ. Authorisation reads
the ``Authorization: Bearer`` header only: cookies (a portal login) never authenticate
here, so CSRF does not apply. No token or an unknown or revoked one: 401; a read token on
a write route: 403. Errors are the broker's ``BrokerError`` answered in OpenAI's envelope
by the app's one error boundary (``broker.errors``).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from quart import Blueprint, Response, current_app, request

from broker.accounts.admin_tokens import AdminToken, AdminTokenRefused, Scope
from broker.accounts.keys import bearer
from broker.accounts.store import FileBroken
from broker.accounts.users import KeyActionRefused, UsersFileError
from broker.admin.bodies import MAX_BODY, bad
from broker.admin.operations import Actor, Operations, operations_of
from broker.broker_state import BrokerState
from broker.core.errors import BrokerError
from broker.forwarded import client_address, parse_networks
from shared.logging import get_logger

log = get_logger("broker.admin.api")

PREFIX = "/admin/v1"
bp = Blueprint("admin_api", __name__)


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # below PREFIX, OpenAPI style: /users/{user}
    scope: Scope | None  # None: no token needed (the OpenAPI document)
    summary: str
    body: type[BaseModel] | None = None
    query: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Call:
    """One authorised call: the broker, its operations, who calls, the body's bytes."""

    state: BrokerState
    ops: Operations
    actor: Actor
    body: bytes


ROUTES: list[Route] = []
Handler = Callable[..., Awaitable[Any]]
_PARAM = re.compile(r"\{(\w+)\}")
_PATH_PARAMS = {"key"}  # a key's name may hold "/": it takes the rest of the path


def quart_rule(path: str) -> str:
    def convert(match: re.Match[str]) -> str:
        name = match.group(1)
        return f"<path:{name}>" if name in _PATH_PARAMS else f"<{name}>"

    return PREFIX + _PARAM.sub(convert, path)


def route(
    method: str,
    path: str,
    scope: Scope | None,
    summary: str,
    *,
    body: type[BaseModel] | None = None,
    query: tuple[str, ...] = (),
) -> Callable[[Handler], Handler]:
    """Declare an admin API route: registered on the blueprint and listed in ``ROUTES``."""

    def register(handler: Handler) -> Handler:
        ROUTES.append(Route(method, path, scope, summary, body, query))

        async def view(**params: str) -> Response:
            call = await authorise(scope, method)
            try:
                return reply(await handler(call, **params))
            except (KeyActionRefused, AdminTokenRefused) as exc:
                raise bad(str(exc), code="refused") from None
            except (UsersFileError, FileBroken) as exc:
                log.error("admin_api_file_broken", error=str(exc))
                raise BrokerError(
                    503, "a broker file is damaged; see its log", "file_broken"
                ) from None

        view.__name__ = "admin_api_" + handler.__name__
        bp.add_url_rule(quart_rule(path), view.__name__, view, methods=[method])
        return handler

    return register


def state_of() -> BrokerState:
    state = current_app.extensions["remotellm"]
    assert isinstance(state, BrokerState)
    return state


def _address(state: BrokerState) -> str | None:
    return client_address(
        request.remote_addr,
        request.headers.get("x-forwarded-for"),
        parse_networks(state.settings.trusted_proxies),
    )


_NEED_TOKEN = (
    "this call needs an admin token: Authorization: Bearer rla-... "
    "(remotellm-broker admin-tokens create)"
)


async def authorise(scope: Scope | None, method: str) -> Call:
    state = state_of()
    ops = operations_of(state)
    address = _address(state)
    if scope is None:
        return Call(state, ops, Actor("anonymous", address), b"")
    secret = bearer(request.headers.get("authorization"))
    token: AdminToken | None = None
    if secret is not None and len(secret) <= 200:
        token = await asyncio.to_thread(ops.tokens.lookup, secret)
    if token is None:
        log.warning("admin_api_refused", path=request.path, address=address, why="token")
        challenge = {"WWW-Authenticate": 'Bearer realm="remotellm-admin"'}
        raise BrokerError(401, _NEED_TOKEN, "invalid_admin_token", headers=challenge)
    if scope == "write" and token.scope != "write":
        log.warning("admin_api_refused", path=request.path, token=token.id, why="scope")
        raise BrokerError(
            403, "this admin token is read-only; this call needs a write token", "read_only_token"
        )
    body = await read_body() if method in ("POST", "PUT", "PATCH") else b""
    return Call(state, ops, Actor.token(token.id, address), body)


async def read_body() -> bytes:
    """The body, at most ``MAX_BODY`` bytes (413 beyond, whether or not it says its size)."""
    length = request.content_length
    if length is not None and length > MAX_BODY:
        raise BrokerError(413, f"the body is larger than {MAX_BODY} bytes", "request_too_large")
    request.body_timeout = 10
    data = bytearray()
    async for chunk in request.body:
        data += chunk
        if len(data) > MAX_BODY:
            raise BrokerError(413, f"the body is larger than {MAX_BODY} bytes", "request_too_large")
    return bytes(data)


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def reply(data: Any, status: int = 200) -> Response:
    body = json.dumps(data, default=_plain, separators=(",", ":"))
    response = Response(body, status=status, content_type="application/json")
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
