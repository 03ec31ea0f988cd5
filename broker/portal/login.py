"""Logging in and out: the login page, GitLab's OAuth round trip, logout.

The OpenID Connect round trips (``oidc_login``) end in ``complete_login`` too."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass

from quart import Response, request

from broker.accounts.identities import IdentityClash
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
    IDENTITY_CLASH,
    NOT_IN_GROUP,
    STATE_MISMATCH,
    TOKEN_EXPIRED,
    TOKEN_INVALID,
    TOKEN_REPLAYED,
    Flow,
    LoginFailed,
)
from broker.portal.security import safe_next
from broker.portal.session import FLOW_COOKIE, SESSION_COOKIE
from broker.state.portal_sessions import GitLabTokens
from shared.logging import get_logger

log = get_logger("broker.portal")

bp = portal_blueprint("portal", __name__)

# What each failed login shows: status, title, what happened, what to do ({idp}: who
# logs the user in, GitLab or an OpenID Connect provider's label).
FAILURES: dict[str, tuple[int, str, str, str]] = {
    GITLAB_DOWN: (
        502,
        "{idp} is not answering",
        "The broker could not reach {idp} to finish your login.",
        "Wait a minute and log in again. If it keeps failing, tell the operator.",
    ),
    DENIED: (
        403,
        "Login cancelled",
        "{idp} says the access request was denied, so you are not logged in.",
        "Log in again and agree on {idp}'s page.",
    ),
    STATE_MISMATCH: (
        400,
        "This login link has expired",
        "The answer from {idp} does not belong to a login started in this browser "
        "(it is old, was used already, or came from somewhere else).",
        "Start again from the login page.",
    ),
    CODE_REFUSED: (
        400,
        "{idp} refused the login",
        "{idp} did not accept the login code (it was used already or has expired).",
        "Start again from the login page.",
    ),
    NOT_IN_GROUP: (
        403,
        "Not allowed here",
        "Your {idp} account is not a member of a group allowed to use this broker.",
        "Ask the operator to add you to one of the allowed groups, then log in again.",
    ),
    TOKEN_INVALID: (
        502,
        "{idp}'s answer failed its checks",
        "The identity token from {idp} is not signed by {idp}'s keys, or names another "
        "issuer or application, so it cannot prove who you are. You are not logged in.",
        "Start again from the login page. If it fails again, tell the operator: the "
        "provider's issuer or client ID may not match the broker's settings.",
    ),
    TOKEN_EXPIRED: (
        400,
        "The login answer has expired",
        "The identity token from {idp} is past its expiry time (or the clocks of the broker "
        "and {idp} disagree), so you are not logged in.",
        "Start again from the login page. If it keeps happening, tell the operator to check "
        "the broker's clock.",
    ),
    TOKEN_REPLAYED: (
        400,
        "This login answer was used already",
        "The answer from {idp} belongs to a login that was completed before (a reloaded or "
        "replayed link), so it cannot log anyone in again.",
        "Start again from the login page.",
    ),
    IDENTITY_CLASH: (
        409,
        "This account cannot log in",
        "Your {idp} account maps to a portal user that belongs to someone else.",
        "Tell the operator: the broker's log names the user ID.",
    ),
}


def failure(kind: str, detail: str = "", idp: str = "GitLab") -> Response:
    status, title, what, todo = FAILURES[kind]
    log.info("portal_login_failed", reason=kind, detail=detail, idp=idp)
    response = pages.page(
        "error",
        status,
        title=title.format(idp=idp),
        what=what.format(idp=idp),
        todo=todo.format(idp=idp),
        retry=True,
    )
    response.delete_cookie(FLOW_COOKIE, path="/portal")
    return response


@dataclass(frozen=True, slots=True)
class LoggedIn:
    """Who a finished login proved: the users-file ID and, for OIDC, the identity."""

    user_id: int
    username: str
    name: str
    idp: str  # GitLab, or the OIDC provider's name
    tokens: GitLabTokens | None = None
    identity: tuple[str, str] | None = None  # OIDC (provider, subject)
    groups: tuple[str, ...] = ()  # for the key defaults of the user's groups


@bp.get("/portal/")
async def home() -> Response:
    portal = portal_context()
    session = await portal.session()
    nxt = safe_next(request.args.get("next"))
    if session is not None and portal.users.user(session.gitlab_id) is not None:
        return redirect(nxt, 303)
    settings = portal.state.settings
    query = "?next=" + quote_path(nxt)
    buttons = [
        (name, oidc.provider.label, f"/portal/login/{name}{query}")
        for name, oidc in portal.oidc.items()
    ]
    return pages.page(
        "login",
        configured=portal.oauth is not None,
        providers=buttons,
        next=nxt,
        gitlab_url=settings.gitlab_url,
        checks_groups=bool(settings.gitlab_allowed_groups),
        login_url="/portal/login" + query,
    )


@bp.get("/portal/login")
async def login() -> Response:
    portal = portal_context()
    if portal.oauth is None:
        return pages.page(
            "error",
            503,
            title="The key portal is not set up" if not portal.oidc else "No GitLab login here",
            what="This broker has no GitLab application configured.",
            todo="Use another login button on the portal's first page, or ask the operator "
            "for an API key.",
            retry=False,
        )
    url, flow = portal.oauth.start(safe_next(request.args.get("next")))
    return start_redirect(url, flow)


def start_redirect(url: str, flow: Flow) -> Response:
    """Off to the identity provider, the flow in its signed cookie."""
    response = redirect(url, 302)
    response.set_cookie(**portal_context().cookies.flow_cookie(flow).header_kwargs())
    return response


def flow_of_callback(provider: str, idp: str = "GitLab") -> Flow | Response:
    """The login this callback belongs to (state and provider match), else a failure page."""
    flow = portal_context().cookies.flow(request.cookies.get(FLOW_COOKIE))
    state = request.args.get("state", "")
    if flow is None or not hmac.compare_digest(state.encode(), flow.state.encode()):
        why = "no login in progress" if flow is None else "state"
        return failure(STATE_MISMATCH, why, idp)
    if flow.provider != provider:  # a mix-up: the answer came back on another provider's URL
        return failure(STATE_MISMATCH, "provider", idp)
    return flow


@bp.get("/portal/callback")
async def callback() -> Response:
    portal = portal_context()
    flow = flow_of_callback("")
    if isinstance(flow, Response):
        return flow
    error = request.args.get("error")
    code = request.args.get("code", "")
    if error:
        return failure(DENIED, error[:64])
    if portal.oauth is None or not code:
        return failure(STATE_MISMATCH, "no code")
    try:
        gitlab = await portal.oauth.finish(code, flow)
    except LoginFailed as exc:
        return failure(exc.kind, exc.detail)
    who = LoggedIn(
        gitlab.id, gitlab.username, gitlab.name, "GitLab", gitlab.tokens, groups=gitlab.groups
    )
    return await complete_login(who, flow)


async def complete_login(who: LoggedIn, flow: Flow) -> Response:
    """Record the login, start a session, show a first key: the callbacks' common end."""
    portal = portal_context()
    try:
        result = await asyncio.to_thread(
            portal.users.login, who.user_id, who.username, who.name, who.identity, who.groups
        )
    except IdentityClash:
        log.error("portal_identity_clash", user_id=who.user_id, idp=who.idp)
        return failure(IDENTITY_CLASH, str(who.user_id), who.idp)
    except UsersFileError as exc:
        log.error("portal_users_file_broken", error=str(exc))
        return users_file_broken()
    _log_login(who, first=result.first_key is not None)
    record = await portal.sessions.create(who.user_id, who.tokens)
    _, spec = portal.cookies.new_session(who.user_id, record.sid)
    target = flow.next
    if result.first_key is not None:
        token = portal.reveals.put(who.user_id, "default", result.first_key)
        target = f"/portal/keys?reveal={token}"
    response = redirect(target, 303)
    response.set_cookie(**spec.header_kwargs())
    response.delete_cookie(FLOW_COOKIE, path="/portal")
    return response


def _log_login(who: LoggedIn, *, first: bool) -> None:
    log.info("portal_login", user=who.username, gitlab_id=who.user_id, idp=who.idp, first=first)
    if who.username in portal_context().state.settings.admins:
        log.warning(
            "admin_by_username",
            user=who.username,
            gitlab_id=who.user_id,
            todo=f"replace --admin {who.username} by --admin-id {who.user_id}",
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
