"""The operator's users page: the list with limits, block, revoke a key, set limits."""

from __future__ import annotations

import asyncio
import time

from quart import Response, request

from broker.accounts.key_scope import ScopeAsk
from broker.admin.operations import run
from broker.chat.store import Counts
from broker.portal import admin_actions, admin_views
from broker.portal.admin import Admin, Refused, admin, admin_blueprint, form_action, section
from broker.portal.context import portal_context

bp = admin_blueprint("portal_admin_users", __name__)
BACK = "/portal/admin/users"


@bp.get("/portal/admin/users")
async def users_page() -> Response:
    who = await admin()
    if isinstance(who, Response):
        return who
    portal = portal_context()
    state, users = portal.state, portal.users
    query = request.args.get("q", "")[:100]
    now = time.time()  # the limiter counts in wall-clock time (calendar quotas)
    limited = admin_views.limited_rows(
        await state.limiter.usage_snapshot(now), now, admin_views.usernames(users.users)
    )
    return section(
        "users",
        who,
        rows=admin_views.user_rows(users, now, query),
        query=query,
        static_keys=len(state.settings.user_api_keys),
        users_error=users.error,
        defaults=admin_views.default_values(state.settings.default_limits),
        labels=admin_views.LIMIT_LABELS,
        limited=limited[:50],
        chat=await _chat_counts(),
    )


async def _chat_counts() -> dict[str, Counts]:
    """How many conversations and messages each user keeps: counts, never content."""
    chat = portal_context().chat
    if chat is None:
        return {}
    return await asyncio.to_thread(chat.store.counts_by_user)


def known_user(form: dict[str, str]) -> str:
    selector = form.get("user", "").strip()
    if not selector or admin_views.find_user(portal_context().users.users, selector) is None:
        raise Refused(
            404,
            "No such user",
            f"There is no user {selector[:80]!r} in the users file.",
            "Go back to the users list and pick one from it.",
        )
    return selector


@form_action(bp, "/portal/admin/users/block", BACK)
async def block(who: Admin, form: dict[str, str]) -> str:
    portal = portal_context()
    users = portal.users
    selector = known_user(form)
    blocked = form.get("blocked") == "1"
    if blocked and admin_views.find_user(users.users, selector) == who.user:
        raise Refused(
            400,
            "You cannot block yourself",
            "Blocking your own account would lock you out of this page.",
            "Ask another admin, or use `remotellm-broker users block` on the server.",
        )
    by = admin_actions.actor(who.user.user_id)
    await run(admin_actions.operations().set_blocked, by, selector, blocked)
    target = admin_views.find_user(users.users, selector)
    if blocked and target is not None:
        await portal.end_sessions(target.gitlab_id, "blocked")
    return "blocked" if blocked else "unblocked"


@form_action(bp, "/portal/admin/users/revoke-key", BACK)
async def revoke_key(who: Admin, form: dict[str, str]) -> str:
    portal = portal_context()
    selector = known_user(form)
    by = admin_actions.actor(who.user.user_id)
    await run(admin_actions.operations().revoke_key, by, selector, form.get("key", ""))
    target = admin_views.find_user(portal.users.users, selector)
    if target is not None:  # whoever holds the key may hold the login too
        await portal.end_sessions(target.gitlab_id, "key revoked")
    return "revoked-key"


@form_action(bp, "/portal/admin/users/limits", BACK)
async def set_limits(who: Admin, form: dict[str, str]) -> str:
    selector = known_user(form)
    values = admin_views.parse_limits(form)
    by = admin_actions.actor(who.user.user_id)
    await run(admin_actions.operations().set_limits, by, selector, values, replace=True)
    return "limits"


@form_action(bp, "/portal/admin/users/scope-key", BACK)
async def scope_key(who: Admin, form: dict[str, str]) -> str:
    """Set any key's models, expiry and label (no group allowance or lifetime cap)."""
    selector = known_user(form)
    expiry = form.get("expires", "").strip() or None  # empty: unchanged
    ask = ScopeAsk(models=form.get("models"), expiry=expiry, label=form.get("label"))
    by = admin_actions.actor(who.user.user_id)
    await run(admin_actions.operations().set_scope, by, selector, form.get("key", ""), ask)
    return "scoped-key"
