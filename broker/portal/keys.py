"""A user's keys page: the list with usage and examples, create, scope, regenerate, delete."""

from __future__ import annotations

import asyncio
import time

from quart import Response, request

from broker.accounts.key_scope import ScopeAsk, shown_lifetime
from broker.accounts.users import KeyActionRefused, UsersFileError
from broker.portal import admin_actions, pages
from broker.portal.common import (
    Viewer,
    form_checked,
    portal_blueprint,
    redirect,
    users_file_broken,
    viewer,
)
from broker.portal.context import portal_context
from broker.portal.usage_view import usage_for
from shared.logging import get_logger

log = get_logger("broker.portal")

bp = portal_blueprint("portal_keys", __name__)


async def keys_page(
    who: Viewer, reveal: tuple[str, str] | None = None, error: str = "", status: int = 200
) -> Response:
    portal = portal_context()
    state = portal.state
    models = await pages.live_models(state)
    usage_path = state.settings.usage_path if state.settings.record_usage else None
    model = models[0] if models else "MODEL"
    allowance = portal.users.allowance(who.user)
    return pages.page(
        "keys",
        status,
        user=who.user,
        csrf=who.csrf,
        is_admin=portal.is_admin(who.user),
        keys=[(k, portal.users.last_used(k)) for k in who.user.keys],
        reveal=reveal,
        error=error,
        models=models,
        base_url=portal.base_url,
        examples=pages.examples(portal.base_url, model, reveal[1] if reveal else None),
        usage=await usage_for(usage_path, who.user.user_id, state.prices),
        prices=state.prices,
        now=time.time(),
        allowed_models=sorted(allowance.models) if allowance.models is not None else None,
        max_lifetime=shown_lifetime(allowance.max_lifetime) if allowance.max_lifetime else None,
    )


@bp.get("/portal/keys")
async def keys() -> Response:
    who = await viewer()
    if isinstance(who, Response):
        return who
    reveal = portal_context().reveals.take(request.args.get("reveal"), who.user.gitlab_id)
    return await keys_page(who, reveal=reveal)


def _scope_asked(form: dict[str, str]) -> ScopeAsk:
    """The scope fields of a form as typed (checked by the users store)."""
    return ScopeAsk(models=form.get("models"), expiry=form.get("expires"), label=form.get("label"))


async def _change(action: str, uid: int, name: str, form: dict[str, str]) -> str:
    """Do one key action; the new secret, or "" when there is none to show."""
    users = portal_context().users
    if action == "create":
        return await asyncio.to_thread(users.create_key, uid, name, _scope_asked(form))
    if action == "scope":
        await asyncio.to_thread(users.scope_key, uid, name, _scope_asked(form))
        return ""
    if action == "regenerate":
        return await asyncio.to_thread(users.regenerate_key, uid, name)
    await asyncio.to_thread(users.delete_key, uid, name)
    return ""


async def key_action(action: str) -> Response:
    who = await viewer()
    if isinstance(who, Response):
        return who
    form = await form_checked(who)
    if isinstance(form, Response):
        return form
    name = form.get("name", "")
    uid = who.user.gitlab_id
    try:
        secret = await _change(action, uid, name, form)
    except KeyActionRefused as exc:
        return await keys_page(who, error=str(exc), status=400)
    except UsersFileError as exc:
        log.error("portal_users_file_broken", error=str(exc))
        return users_file_broken()
    log.info("portal_key_changed", action=action, user=who.user.username, key=name)
    await admin_actions.own_key_changed(who.user, action, name)
    if not secret:
        return redirect("/portal/keys", 303)
    token = portal_context().reveals.put(uid, name.strip(), secret)
    return redirect(f"/portal/keys?reveal={token}", 303)


@bp.post("/portal/keys")
async def create_key() -> Response:
    return await key_action("create")


@bp.post("/portal/keys/scope")
async def scope_key() -> Response:
    return await key_action("scope")


@bp.post("/portal/keys/regenerate")
async def regenerate_key() -> Response:
    return await key_action("regenerate")


@bp.post("/portal/keys/delete")
async def delete_key() -> Response:
    return await key_action("delete")
