"""What every portal page shares: a blueprint's hooks, who is asking, checked forms, replies."""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import quote

from quart import Blueprint, Response, request

from broker.accounts.users import UserEntry
from broker.portal import pages
from broker.portal.context import portal_context
from broker.portal.csrf import FORM_FIELD, csrf_ok, csrf_token
from broker.portal.security import add_security_headers
from broker.portal.session import Session
from shared.logging import get_logger

log = get_logger("broker.portal")


@dataclass(frozen=True, slots=True)
class Viewer:
    session: Session
    user: UserEntry
    csrf: str


def portal_blueprint(name: str, import_name: str, *, html_errors: bool = True) -> Blueprint:
    """A blueprint whose answers carry the security headers (and, if asked, whose
    unexpected errors are an HTML page instead of the app's JSON error)."""
    bp = Blueprint(name, import_name)
    bp.after_request(_headers)
    if html_errors:
        bp.errorhandler(Exception)(_unexpected)
    return bp


async def _headers(response: Response) -> Response:
    return add_security_headers(response)


async def _unexpected(exc: Exception) -> Response:
    log.exception("portal_unhandled_error", error_type=type(exc).__name__)
    return add_security_headers(
        pages.page(
            "error",
            500,
            title="Something broke",
            what="The portal hit an internal error; it has been logged.",
            todo="Try again; if it keeps happening, tell the operator.",
            retry=False,
        )
    )


async def viewer() -> Viewer | Response:
    """The logged-in, unblocked user; else the login page (or the blocked page)."""
    portal = portal_context()
    session = await portal.session()
    user = portal.users.user(session.gitlab_id) if session else None
    if session is None or user is None:
        target = request.full_path.rstrip("?") if request.method == "GET" else ""
        query = f"?next={quote_path(target)}" if target else ""
        return redirect("/portal/" + query, 303)
    if user.blocked:
        await portal.end_sessions(user.gitlab_id, "blocked")
        return pages.page("blocked", 403, user=user, csrf="")
    return Viewer(session, user, csrf_token(portal.cookies.secret, session))


async def form_checked(who: Viewer) -> dict[str, str] | Response:
    """The request's form if its CSRF token is this session's; else a page saying so."""
    form = await request.form
    if not csrf_ok(portal_context().cookies.secret, who.session, form.get(FORM_FIELD)):
        log.warning("portal_csrf_refused", path=request.path, user=who.user.username)
        return pages.page(
            "error",
            403,
            title="This form has expired",
            what="The form was not sent from this portal page, or it is older than your login.",
            todo="Reload the page and try again.",
            retry=False,
        )
    return {k: str(v) for k, v in form.items()}


def users_file_broken() -> Response:
    return pages.page(
        "error",
        503,
        title="The portal cannot save right now",
        what="The broker's users file is damaged, so changes cannot be saved. Keys keep working.",
        todo="Tell the operator; the broker's log says what is wrong with the file.",
        retry=False,
    )


def redirect(location: str, status: int) -> Response:
    return Response("", status=status, headers={"Location": location})


def json_reply(body: dict[str, str], status: int) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def quote_path(value: str) -> str:
    return quote(value, safe="/")
