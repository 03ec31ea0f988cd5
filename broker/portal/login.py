"""Logging in and out: the login page, GitLab's OAuth round trip, logout."""

from __future__ import annotations

import asyncio
import hmac

from quart import Response, request

from broker.accounts.users import UsersFileError
from broker.portal import pages
from broker.portal.common import (
    Viewer,
    form_checked,
    portal_blueprint,
    quote_path,
    redirect,
    users_file_broken,
    viewer,
)
from broker.portal.context import portal_context
from broker.portal.oauth import (
    CODE_REFUSED,
    DENIED,
    GITLAB_DOWN,
    NOT_IN_GROUP,
    STATE_MISMATCH,
    GitLabUser,
    LoginFailed,
)
from broker.portal.security import safe_next
from broker.portal.session import FLOW_COOKIE, SESSION_COOKIE
from shared.logging import get_logger

log = get_logger("broker.portal")

bp = portal_blueprint("portal", __name__)

# What each failed login shows: status, title, what happened, what to do.
FAILURES: dict[str, tuple[int, str, str, str]] = {
    GITLAB_DOWN: (
        502,
        "GitLab is not answering",
        "The broker could not reach GitLab to finish your login.",
        "Wait a minute and log in again. If it keeps failing, tell the operator.",
    ),
    DENIED: (
        403,
        "Login cancelled",
        "GitLab says the access request was denied, so you are not logged in.",
        "Log in again and choose Authorize on GitLab's page.",
    ),
    STATE_MISMATCH: (
        400,
        "This login link has expired",
        "The answer from GitLab does not belong to a login started in this browser "
        "(it is old, was used already, or came from somewhere else).",
        "Start again from the login page.",
    ),
    CODE_REFUSED: (
        400,
        "GitLab refused the login",
        "GitLab did not accept the login code (it was used already or has expired).",
        "Start again from the login page.",
    ),
    NOT_IN_GROUP: (
        403,
        "Not allowed here",
        "Your GitLab account is not a member of a group allowed to use this broker.",
        "Ask the operator to add you to one of the allowed groups, then log in again.",
    ),
}


def failure(kind: str, detail: str = "") -> Response:
    status, title, what, todo = FAILURES[kind]
    log.info("portal_login_failed", reason=kind, detail=detail)
    response = pages.page("error", status, title=title, what=what, todo=todo, retry=True)
    response.delete_cookie(FLOW_COOKIE, path="/portal")
    return response


@bp.get("/portal/")
async def home() -> Response:
    portal = portal_context()
    session = await portal.session()
    nxt = safe_next(request.args.get("next"))
    if session is not None and portal.users.user(session.gitlab_id) is not None:
        return redirect(nxt, 303)
    settings = portal.state.settings
    return pages.page(
        "login",
        configured=portal.oauth is not None,
        next=nxt,
        gitlab_url=settings.gitlab_url,
        checks_groups=bool(settings.gitlab_allowed_groups),
        login_url="/portal/login?next=" + quote_path(nxt),
    )


@bp.get("/portal/login")
async def login() -> Response:
    portal = portal_context()
    if portal.oauth is None:
        return pages.page(
            "error",
            503,
            title="The key portal is not set up",
            what="This broker has no GitLab application configured.",
            todo="Ask the operator for an API key, or to set --gitlab-client-id.",
            retry=False,
        )
    url, flow = portal.oauth.start(safe_next(request.args.get("next")))
    response = redirect(url, 302)
    response.set_cookie(**portal.cookies.flow_cookie(flow).header_kwargs())
    return response


@bp.get("/portal/callback")
async def callback() -> Response:
    portal = portal_context()
    flow = portal.cookies.flow(request.cookies.get(FLOW_COOKIE))
    error = request.args.get("error")
    state = request.args.get("state", "")
    code = request.args.get("code", "")
    if flow is None or not hmac.compare_digest(state.encode(), flow.state.encode()):
        return failure(STATE_MISMATCH, "no login in progress" if flow is None else "state")
    if error:
        return failure(DENIED, error[:64])
    if portal.oauth is None or not code:
        return failure(STATE_MISMATCH, "no code")
    try:
        gitlab = await portal.oauth.finish(code, flow)
        result = await asyncio.to_thread(
            portal.users.login, gitlab.id, gitlab.username, gitlab.name, gitlab.groups
        )
    except LoginFailed as exc:
        return failure(exc.kind, exc.detail)
    except UsersFileError as exc:
        log.error("portal_users_file_broken", error=str(exc))
        return users_file_broken()
    _log_login(gitlab, first=result.first_key is not None)
    record = await portal.sessions.create(gitlab.id, gitlab.tokens)
    _, spec = portal.cookies.new_session(gitlab.id, record.sid)
    target = flow.next
    if result.first_key is not None:
        token = portal.reveals.put(gitlab.id, "default", result.first_key)
        target = f"/portal/keys?reveal={token}"
    response = redirect(target, 303)
    response.set_cookie(**spec.header_kwargs())
    response.delete_cookie(FLOW_COOKIE, path="/portal")
    return response


def _log_login(gitlab: GitLabUser, *, first: bool) -> None:
    log.info("portal_login", user=gitlab.username, gitlab_id=gitlab.id, first=first)
    if gitlab.username in portal_context().state.settings.admins:
        log.warning(
            "admin_by_username",
            user=gitlab.username,
            gitlab_id=gitlab.id,
            todo=f"replace --admin {gitlab.username} by --admin-id {gitlab.id}",
        )


@bp.post("/portal/logout")
async def logout() -> Response:
    who = await viewer()
    if isinstance(who, Viewer):
        form = await form_checked(who)
        if isinstance(form, Response):
            return form
        await portal_context().sessions.end(who.session.sid, who.user.gitlab_id)
        log.info("portal_logout", user=who.user.username)
    response = redirect("/portal/", 303)
    response.delete_cookie(SESSION_COOKIE, path="/portal")
    return response
