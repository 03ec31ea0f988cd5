"""The admin API's endpoints under ``/admin/v1``: one twin for every admin page action.

Reads come from the same views as the admin pages (``broker.portal.admin_views``,
``admin_usage``: the ledger's one read side, ``broker.usage.query``); every change goes
through ``broker.admin.operations`` with the token as the actor, so it is audited like a
change made on the pages or with the CLI.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from typing import Any

from quart import current_app, request

from broker.accounts.enrollment import Enrolled
from broker.accounts.key_scope import ScopeAsk
from broker.accounts.users import KeyEntry, UserEntry
from broker.admin.api import Call, route
from broker.admin.bodies import (
    ENROLLMENT,
    KEY,
    USER,
    LimitsBody,
    LlmKeyBody,
    ScopeBody,
    parse_body,
    path_id,
    query_int,
    query_text,
)
from broker.admin.openapi import document
from broker.admin.operations import Verdict, decide_connector, run
from broker.core.errors import BrokerError
from broker.portal import admin_usage, admin_views
from broker.portal.context import EXTENSION, PortalContext
from broker.usage.audit import AuditFilter, entries
from broker.usage.query import LedgerMissing

MAX_AUDIT_PAGE = 500


def _not_found(what: str) -> BrokerError:
    return BrokerError(404, f"there is no {what}", "not_found")


def _user(call: Call, selector: str) -> UserEntry:
    found = call.state.users.users
    user = admin_views.find_user(found, path_id(selector, USER, "user"))
    if user is None:
        raise _not_found(f"user {selector!r}")
    return user


def _user_json(call: Call, user: UserEntry) -> dict[str, Any]:
    row = next(
        r
        for r in admin_views.user_rows(call.state.users, time.time())
        if r.gitlab_id == user.gitlab_id
    )
    return asdict(row)


@route("GET", "/users", "read", "Every user with keys, limits and last use", query=("q",))
async def list_users(call: Call) -> dict[str, Any]:
    query = query_text(request.args.get("q"), "q", 100) or ""
    return {"users": admin_views.user_rows(call.state.users, time.time(), query)}


@route("GET", "/overview", "read", "Counts: users, sessions, models, in flight, queued")
async def overview(call: Call) -> dict[str, Any]:
    state = call.state
    users = state.users.users
    view = await state.relay.view()
    enrolled = state.enrollment.entries if state.enrollment is not None else []
    return {
        "users": len(users),
        "blocked": sum(u.blocked for u in users),
        "sessions": len(view.sessions),
        "models": sorted(view.live_models),
        "in_flight": view.in_flight,
        "queued": sum(view.queue_depth.values()),
        "pending_enrollments": len(admin_views.enrollment_groups(enrolled)["pending"]),
        "enrollment_open": state.settings.allow_enrollment,
    }


@route("GET", "/limited", "read", "Who the limiter counts now, the recently refused first")
async def limited(call: Call) -> dict[str, Any]:
    state, now = call.state, time.time()  # the limiter counts in wall-clock time
    names = admin_views.usernames(state.users.users)
    rows = admin_views.limited_rows(await state.limiter.usage_snapshot(now), now, names)
    return {"limited": rows, "defaults": asdict(state.settings.default_limits)}


@route("GET", "/users/{user}", "read", "One user (username or numeric ID)")
async def get_user(call: Call, user: str) -> dict[str, Any]:
    return _user_json(call, _user(call, user))


async def _block(call: Call, selector: str, blocked: bool) -> dict[str, Any]:
    user = _user(call, selector)
    await run(call.ops.set_blocked, call.actor, user.username, blocked)
    portal = current_app.extensions.get(EXTENSION)
    if blocked and isinstance(portal, PortalContext):  # their portal logins end too
        await portal.end_sessions(user.gitlab_id, "blocked")
    return _user_json(call, user)


@route("POST", "/users/{user}/block", "write", "Block a user: their keys stop working")
async def block_user(call: Call, user: str) -> dict[str, Any]:
    return await _block(call, user, True)


@route("POST", "/users/{user}/unblock", "write", "Unblock a user")
async def unblock_user(call: Call, user: str) -> dict[str, Any]:
    return await _block(call, user, False)


def _key_json(call: Call, key: KeyEntry) -> dict[str, Any]:
    last_used = call.state.users.last_used(key)
    return {
        "name": key.name,
        "prefix": key.prefix,
        "created": key.created,
        "last_used": last_used,
        "models": key.models,
        "expires": key.expires,
        "expired": key.is_expired(time.time()),
        "label": key.label,
    }


@route("GET", "/users/{user}/keys", "read", "A user's keys (names and prefixes, never secrets)")
async def list_keys(call: Call, user: str) -> dict[str, Any]:
    return {"keys": [_key_json(call, k) for k in _user(call, user).keys]}


@route("DELETE", "/users/{user}/keys/{key}", "write", "Revoke a key (by name or prefix)")
async def revoke_key(call: Call, user: str, key: str) -> dict[str, Any]:
    entry = _user(call, user)
    path_id(key, KEY, "key")
    if not any(key in (k.name, k.prefix) for k in entry.keys):
        raise _not_found(f"key {key!r} of {entry.username}")
    revoked = await run(call.ops.revoke_key, call.actor, entry.username, key)
    portal = current_app.extensions.get(EXTENSION)
    if isinstance(portal, PortalContext):  # whoever holds the key may hold the login too
        await portal.end_sessions(entry.gitlab_id, "key revoked")
    return {"revoked": {"name": revoked.name, "prefix": revoked.prefix}}


@route(
    "POST",
    "/users/{user}/keys/{key}/scope",
    "write",
    "Set a key's models, expiry or label",
    body=ScopeBody,
)
async def scope_key(call: Call, user: str, key: str) -> dict[str, Any]:
    entry = _user(call, user)
    path_id(key, KEY, "key")
    body = parse_body(ScopeBody, call.body)
    models = None if body.models is None else ",".join(body.models) or "*"
    ask = ScopeAsk(models=models, expiry=body.expires, label=body.label)
    scoped = await run(call.ops.set_scope, call.actor, entry.username, key, ask)
    return {"key": _key_json(call, scoped)}


def _limits_json(call: Call, user: UserEntry) -> dict[str, Any]:
    def dump(limits: Any) -> dict[str, Any]:
        return limits.model_dump(exclude_none=True) if limits is not None else {}

    return {
        "user": user.username,
        "limits": dump(user.limits),
        "keys": [{"name": k.name, "prefix": k.prefix, "limits": dump(k.limits)} for k in user.keys],
        "defaults": asdict(call.state.settings.default_limits),
    }


@route("GET", "/users/{user}/limits", "read", "A user's and their keys' limit overrides")
async def get_limits(call: Call, user: str) -> dict[str, Any]:
    return _limits_json(call, _user(call, user))


@route("PUT", "/users/{user}/limits", "write", "Set limit overrides", body=LimitsBody)
async def set_limits(call: Call, user: str) -> dict[str, Any]:
    entry = _user(call, user)
    body = parse_body(LimitsBody, call.body)
    values = dict(body.limits)
    changed = await run(
        call.ops.set_limits, call.actor, entry.username, values, key=body.key, replace=body.replace
    )
    return _limits_json(call, changed)


def _enrolled_json(entry: Enrolled) -> dict[str, Any]:
    data = entry.model_dump(mode="json", exclude={"secret_sha256", "token_sha256", "llm_api_key"})
    return {**data, "fingerprint": entry.fingerprint, "llm_api_key_set": bool(entry.llm_api_key)}


@route("GET", "/connectors", "read", "Live connector sessions and enrollments")
async def list_connectors(call: Call) -> dict[str, Any]:
    state = call.state
    enrolled = state.enrollment.entries if state.enrollment is not None else []
    view = await state.relay.view()
    return {
        "sessions": admin_views.session_rows(view, state.poll_modes, enrolled),
        "enrollments": [_enrolled_json(e) for e in enrolled],
        "enrollment_open": state.settings.allow_enrollment,
    }


async def _decide(call: Call, verdict: Verdict, entry_id: str) -> dict[str, Any]:
    path_id(entry_id, ENROLLMENT, "enrollment")
    entry = await decide_connector(call.state, call.actor, verdict, entry_id)
    return _enrolled_json(entry)


@route("POST", "/connectors/{enrollment}/approve", "write", "Approve an enrollment")
async def approve(call: Call, enrollment: str) -> dict[str, Any]:
    return await _decide(call, "approve", enrollment)


@route("POST", "/connectors/{enrollment}/reject", "write", "Reject an enrollment")
async def reject(call: Call, enrollment: str) -> dict[str, Any]:
    return await _decide(call, "reject", enrollment)


@route("POST", "/connectors/{enrollment}/revoke", "write", "Revoke: its sessions end")
async def revoke(call: Call, enrollment: str) -> dict[str, Any]:
    return await _decide(call, "revoke", enrollment)


@route(
    "PUT", "/connectors/{enrollment}/llm-key", "write", "Set its upstream LLM key", body=LlmKeyBody
)
async def set_llm_key(call: Call, enrollment: str) -> dict[str, Any]:
    path_id(enrollment, ENROLLMENT, "enrollment")
    body = parse_body(LlmKeyBody, call.body)
    entry = await run(call.ops.set_llm_key, call.actor, enrollment, body.llm_api_key)
    return _enrolled_json(entry)


@route("GET", "/queues", "read", "Waiting requests per model")
async def queues(call: Call) -> dict[str, Any]:
    relay = call.state.relay
    names = admin_views.usernames(call.state.users.users)
    return {"queues": admin_views.queue_rows(await relay.view(), await relay.waiting(), names)}


def _args(names: tuple[str, ...]) -> dict[str, str]:
    return {n: request.args[n] for n in names if n in request.args}


USAGE_QUERY = ("period", "from", "to", "user", "model")


@route("GET", "/usage", "read", "Usage totals by user and model", query=USAGE_QUERY)
async def usage(call: Call) -> dict[str, Any]:
    try:
        view = await admin_usage.usage_view(call.state, call.state.users, _args(USAGE_QUERY))
    except admin_usage.BadQuery as exc:
        raise BrokerError(400, str(exc), "invalid_value") from None
    data = asdict(view)
    data.pop("chart")
    data.pop("names")
    return data


LOG_QUERY = ("user", "model", "status", "request_id")


@route("GET", "/requests", "read", "The request log, newest first", query=LOG_QUERY)
async def requests_log(call: Call) -> dict[str, Any]:
    try:
        view = await admin_usage.request_log(call.state, call.state.users, _args(LOG_QUERY))
    except admin_usage.BadQuery as exc:
        raise BrokerError(400, str(exc), "invalid_value") from None
    return {"requests": view.rows, "limit": view.limit, "note": view.note}


AUDIT_QUERY = ("since", "until", "actor", "action", "limit", "offset")


def _audit_filter() -> AuditFilter:
    now = int(time.time()) + 86400
    since = query_int(request.args.get("since"), "since", 0, now, -1)
    until = query_int(request.args.get("until"), "until", 0, now, -1)
    return AuditFilter(
        since=None if since < 0 else float(since),
        until=None if until < 0 else float(until),
        actor=query_text(request.args.get("actor"), "actor"),
        action=query_text(request.args.get("action"), "action", 64),
    )


@route("GET", "/audit", "read", "The audit trail, newest first", query=AUDIT_QUERY)
async def audit(call: Call) -> dict[str, Any]:
    filt = _audit_filter()
    limit = query_int(request.args.get("limit"), "limit", 1, MAX_AUDIT_PAGE, 100)
    offset = query_int(request.args.get("offset"), "offset", 0, 10**9, 0)
    db = call.state.settings.usage_path
    try:
        found = await asyncio.to_thread(
            entries, db, filt, newest_first=True, limit=limit, offset=offset
        )
    except LedgerMissing:
        found = []
    return {"entries": [e.as_json() for e in found], "limit": limit, "offset": offset}


@route("GET", "/openapi.json", None, "This API's OpenAPI 3.1 document")
async def openapi(call: Call) -> dict[str, Any]:
    return document()
