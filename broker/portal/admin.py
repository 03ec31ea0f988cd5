"""What the operator's pages under /portal/admin share, for the GitLab users in ``--admin-id``.

Same session cookie, CSRF token, templates and security headers as the rest of the portal.
Sections, one page each: users (``admin_users``), connectors and queues
(``admin_connectors``), usage and the request log (``admin_reports``). Forms POST with the
CSRF token and answer with a redirect back to their section (``?done=`` names what
happened); bad input gets a page that says what to do.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlencode

from quart import Blueprint, Response, request

from broker.accounts.enrollment import Enrolled, EnrollmentError
from broker.accounts.users import KeyActionRefused, UserEntry, UsersFileError
from broker.portal import pages
from broker.portal.common import portal_blueprint
from broker.portal.context import PortalContext, portal_context
from broker.portal.csrf import FORM_FIELD, csrf_ok, csrf_token
from broker.portal.session import Session
from shared.logging import get_logger

log = get_logger("broker.portal.admin")

SECTIONS = ("users", "connectors", "queues", "usage", "requests", "audit")

# What a finished action says on the page it returns to (fixed texts: nothing reflected).
DONE = {
    "blocked": "The user is blocked: their keys stop working at once.",
    "unblocked": "The user is unblocked.",
    "revoked-key": "The key is revoked.",
    "approved": "Approved: the connector receives its token on its next ask.",
    "rejected": "Rejected: the connector is told so and stops asking.",
    "revoked": "Revoked: its sessions ended and its token no longer works.",
    "llm-key": "The upstream LLM key is saved; the next request uses it.",
    "limits": "The limits are saved.",
}


@dataclass(frozen=True, slots=True)
class Admin:
    session: Session
    user: UserEntry
    csrf: str


Handler = Callable[[Admin, dict[str, str]], Awaitable[str]]


class Refused(Exception):
    """An admin form that cannot be done: the page says what and what to do."""

    def __init__(self, status: int, title: str, what: str, todo: str) -> None:
        super().__init__(what)
        self.status, self.title, self.what, self.todo = status, title, what, todo


def admin_blueprint(name: str, import_name: str) -> Blueprint:
    """Unexpected errors on admin pages go to the app's handler, as they always did."""
    return portal_blueprint(name, import_name, html_errors=False)


async def admin() -> Admin | Response:
    """The logged-in admin; else the login page, the blocked page or a 403 saying why."""
    portal = portal_context()
    session = await portal.session()
    user = portal.users.user(session.gitlab_id) if session else None
    if session is None or user is None:
        target = request.full_path.rstrip("?") if request.method == "GET" else ""
        query = "?" + urlencode({"next": target}) if target else ""
        return Response("", status=303, headers={"Location": "/portal/" + query})
    csrf = csrf_token(portal.cookies.secret, session)
    if user.blocked:
        await portal.end_sessions(user.gitlab_id, "blocked")
        return pages.page("blocked", 403, user=user, csrf="")
    if not portal.is_admin(user):
        log.warning("admin_refused", user=user.username, path=request.path)
        return pages.page(
            "error",
            403,
            user=user,
            csrf=csrf,
            title="Only for the broker's operators",
            what=f"You are logged in as {user.username} (GitLab user ID {user.gitlab_id}), "
            "who is not an admin of this broker.",
            todo=f"If you run this broker, add --admin-id {user.gitlab_id} "
            "(REMOTELLM_BROKER_ADMIN_IDS) and restart it; otherwise go back to your keys.",
            retry=False,
        )
    return Admin(session, user, csrf)


def section(name: str, who: Admin, status: int = 200, **context: object) -> Response:
    done = DONE.get(request.args.get("done", ""))
    return pages.page(
        f"admin/{name}",
        status,
        user=who.user,
        csrf=who.csrf,
        is_admin=True,
        section=name,
        sections=SECTIONS,
        done=done,
        **context,
    )


def refused(who: Admin | None, exc: Refused) -> Response:
    return pages.page(
        "error",
        exc.status,
        user=who.user if who else None,
        csrf=who.csrf if who else "",
        is_admin=who is not None,
        title=exc.title,
        what=exc.what,
        todo=exc.todo,
        retry=False,
    )


def form_action(bp: Blueprint, path: str, back: str) -> Callable[[Handler], Handler]:
    """Register ``handler`` as the POST form at ``path``; it answers with a redirect to
    ``back`` (or a page saying why it could not be done)."""

    def register(handler: Handler) -> Handler:
        async def view() -> Response:
            return await run_form(back, handler)

        view.__name__ = "admin_" + path.strip("/").replace("/", "_").replace("-", "_")
        bp.add_url_rule(path, view.__name__, view, methods=["POST"])
        return handler

    return register


_EXPIRED = Refused(
    403,
    "This form has expired",
    "The form was not sent from this admin page, or it is older than your login.",
    "Reload the page and try again.",
)
_USERS_FILE = Refused(
    503,
    "The users file cannot be saved",
    "The broker's users file is damaged, so changes cannot be saved.",
    "Fix the file (the broker's log says what is wrong), then try again.",
)


async def run_form(back: str, handler: Handler) -> Response:
    who = await admin()
    if isinstance(who, Response):
        return who
    form = {k: str(v) for k, v in (await request.form).items()}
    if not csrf_ok(portal_context().cookies.secret, who.session, form.get(FORM_FIELD)):
        log.warning("portal_csrf_refused", path=request.path, user=who.user.username)
        return refused(who, _EXPIRED)
    try:
        done = await handler(who, form)
    except Refused as exc:
        return refused(who, exc)
    except EnrollmentError as exc:
        return refused(who, Refused(exc.status, "That cannot be done", exc.message, _back(back)))
    except KeyActionRefused as exc:
        return refused(who, Refused(400, "That cannot be done", str(exc), _back(back)))
    except UsersFileError as exc:
        log.error("portal_users_file_broken", error=str(exc))
        return refused(who, _USERS_FILE)
    log.info("admin_action", action=done, user=who.user.username, path=request.path)
    return Response("", status=303, headers={"Location": f"{back}?done={done}"})


def enrolled(portal: PortalContext) -> list[Enrolled]:
    store = portal.state.enrollment
    return store.entries if store is not None else []


def _back(path: str) -> str:
    return f"Go back to {path} and reload it: it shows what can be done now."
