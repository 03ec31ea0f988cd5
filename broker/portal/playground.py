"""The playground, its one-page key, the connect page and the portal's static files."""

from __future__ import annotations

import asyncio

from quart import Response, request

from broker.accounts.users import KeyActionRefused, UsersFileError
from broker.portal import pages
from broker.portal.common import json_reply, portal_blueprint, viewer
from broker.portal.context import portal_context
from broker.portal.csrf import HEADER, csrf_ok, csrf_token
from shared.logging import get_logger

log = get_logger("broker.portal")

PLAYGROUND_KEY = "playground"

bp = portal_blueprint("portal_playground", __name__)


@bp.get("/portal/playground")
async def playground() -> Response:
    who = await viewer()
    if isinstance(who, Response):
        return who
    portal = portal_context()
    return pages.page(
        "playground",
        user=who.user,
        csrf=who.csrf,
        is_admin=portal.is_admin(who.user),
        models=await pages.live_models(portal.state),
        base_url=portal.base_url,
    )


@bp.post("/portal/api/playground-key")
async def playground_key() -> Response:
    """A fresh secret for the key named "playground", for the page's memory only."""
    portal = portal_context()
    session = await portal.session()
    user = portal.users.user(session.gitlab_id) if session else None
    if session is None or user is None:
        return json_reply({"error": "not logged in"}, 401)
    if user.blocked:
        return json_reply({"error": "this user is blocked"}, 403)
    if not csrf_ok(portal.cookies.secret, session, request.headers.get(HEADER)):
        return json_reply({"error": "bad CSRF token; reload the page"}, 403)
    try:
        secret = await asyncio.to_thread(
            portal.users.regenerate_key, user.gitlab_id, PLAYGROUND_KEY, True
        )
    except (KeyActionRefused, UsersFileError) as exc:
        return json_reply({"error": str(exc)}, 409)
    log.info("portal_key_changed", action="playground", user=user.username)
    return json_reply({"key": secret, "name": PLAYGROUND_KEY}, 200)


@bp.get("/portal/connect")
async def connect() -> Response:
    portal = portal_context()
    session = await portal.session()
    user = portal.users.user(session.gitlab_id) if session else None
    return pages.page(
        "connect",
        user=user,
        csrf=csrf_token(portal.cookies.secret, session) if session else "",
        command=pages.connector_command(portal.state.settings.advertised_url),
        models=await pages.live_models(portal.state),
    )


@bp.get("/portal/static/<name>")
async def static(name: str) -> Response:
    found = pages.static_file(name)
    if found is None:
        return Response("not found", status=404, content_type="text/plain")
    return found
