"""The operator's pages under /portal/admin, for the GitLab users in ``--admin-id``.

Same session cookie, CSRF token, templates and security headers as the rest of the portal.
Sections, one page each: users, connectors (live sessions and enrollment), queues, usage,
request log. Forms POST with the CSRF token and answer with a redirect back to their
section (``?done=`` names what happened); bad input gets a page that says what to do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlencode

from quart import Blueprint, Response, request

from broker.accounts.enrollment import Enrolled, EnrollmentError
from broker.accounts.users import KeyActionRefused, UserEntry, UsersFileError
from broker.portal import admin_actions, admin_usage, admin_views, pages
from broker.portal.csrf import FORM_FIELD, csrf_ok, csrf_token
from broker.portal.routes import Portal
from broker.portal.security import add_security_headers
from broker.portal.session import Session
from shared.logging import get_logger

log = get_logger("broker.portal.admin")

SECTIONS = ("users", "connectors", "queues", "usage", "requests")

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


def create_admin_blueprint(portal: Portal) -> Blueprint:
    bp = Blueprint("portal_admin", __name__)
    state = portal.state
    users = portal.users
    cookies = portal.cookies

    @bp.after_request
    async def headers(response: Response) -> Response:
        return add_security_headers(response)

    async def admin() -> Admin | Response:
        session = await portal.session()
        user = users.user(session.gitlab_id) if session else None
        if session is None or user is None:
            target = request.full_path.rstrip("?") if request.method == "GET" else ""
            query = "?" + urlencode({"next": target}) if target else ""
            return Response("", status=303, headers={"Location": "/portal/" + query})
        csrf = csrf_token(cookies.secret, session)
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

    def form_action(path: str, back: str, handler: Handler) -> None:
        async def view() -> Response:
            who = await admin()
            if isinstance(who, Response):
                return who
            form = {k: str(v) for k, v in (await request.form).items()}
            if not csrf_ok(cookies.secret, who.session, form.get(FORM_FIELD)):
                log.warning("portal_csrf_refused", path=request.path, user=who.user.username)
                return refused(
                    who,
                    Refused(
                        403,
                        "This form has expired",
                        "The form was not sent from this admin page, or it is older than "
                        "your login.",
                        "Reload the page and try again.",
                    ),
                )
            try:
                done = await handler(who, form)
            except Refused as exc:
                return refused(who, exc)
            except EnrollmentError as exc:
                return refused(
                    who, Refused(exc.status, "That cannot be done", exc.message, _back(back))
                )
            except KeyActionRefused as exc:
                return refused(who, Refused(400, "That cannot be done", str(exc), _back(back)))
            except UsersFileError as exc:
                log.error("portal_users_file_broken", error=str(exc))
                return refused(
                    who,
                    Refused(
                        503,
                        "The users file cannot be saved",
                        "The broker's users file is damaged, so changes cannot be saved.",
                        "Fix the file (the broker's log says what is wrong), then try again.",
                    ),
                )
            log.info("admin_action", action=done, user=who.user.username, path=request.path)
            return Response("", status=303, headers={"Location": f"{back}?done={done}"})

        view.__name__ = "admin_" + path.strip("/").replace("/", "_").replace("-", "_")
        bp.add_url_rule(path, view.__name__, view, methods=["POST"])

    # -- pages ------------------------------------------------------------------------------

    @bp.get("/portal/admin")
    @bp.get("/portal/admin/")
    async def overview() -> Response:
        who = await admin()
        if isinstance(who, Response):
            return who
        view = await state.relay.view()
        groups = admin_views.enrollment_groups(_entries(portal))
        return section(
            "overview",
            who,
            users=len(users.users),
            blocked=sum(u.blocked for u in users.users),
            sessions=len(view.sessions),
            models=sorted(view.live_models),
            in_flight=view.in_flight,
            queued=sum(view.queue_depth.values()),
            pending=len(groups["pending"]),
            enrollment=state.settings.allow_enrollment,
        )

    @bp.get("/portal/admin/users")
    async def users_page() -> Response:
        who = await admin()
        if isinstance(who, Response):
            return who
        query = request.args.get("q", "")[:100]
        now = time.time()  # the limiter counts in wall-clock time (calendar quotas)
        limited = admin_views.limited_rows(
            await state.limiter.usage_snapshot(now), now, admin_views.usernames(users.users)
        )
        return section(
            "users",
            who,
            rows=admin_views.user_rows(users, query),
            query=query,
            static_keys=len(state.settings.user_api_keys),
            users_error=users.error,
            defaults=admin_views.default_values(state.settings.default_limits),
            labels=admin_views.LIMIT_LABELS,
            limited=limited[:50],
        )

    @bp.get("/portal/admin/connectors")
    async def connectors_page() -> Response:
        who = await admin()
        if isinstance(who, Response):
            return who
        entries = _entries(portal)
        return section(
            "connectors",
            who,
            sessions=admin_views.session_rows(await state.relay.view(), state.poll_modes, entries),
            groups=admin_views.enrollment_groups(entries),
            enrollment=state.settings.allow_enrollment,
            enrolled_error=state.enrollment.error if state.enrollment else None,
        )

    @bp.get("/portal/admin/queues")
    async def queues_page() -> Response:
        who = await admin()
        if isinstance(who, Response):
            return who
        names = admin_views.usernames(users.users)
        return section(
            "queues",
            who,
            rows=admin_views.queue_rows(
                await state.relay.view(), await state.relay.waiting(), names
            ),
            queue_max=state.settings.queue_max,
            queue_wait=state.settings.queue_wait,
        )

    @bp.get("/portal/admin/usage")
    async def usage_page() -> Response:
        who = await admin()
        if isinstance(who, Response):
            return who
        try:
            view = await admin_usage.usage_view(state, users, request.args)
        except admin_usage.BadQuery as exc:
            return refused(who, Refused(400, "That period cannot be shown", str(exc), _USAGE_TODO))
        return section("usage", who, view=view)

    @bp.get("/portal/admin/requests")
    async def requests_page() -> Response:
        who = await admin()
        if isinstance(who, Response):
            return who
        try:
            view = await admin_usage.request_log(state, users, request.args)
        except admin_usage.BadQuery as exc:
            return refused(who, Refused(400, "That filter cannot be used", str(exc), _LOG_TODO))
        return section("requests", who, view=view)

    # -- forms ------------------------------------------------------------------------------

    def known_user(form: dict[str, str]) -> str:
        selector = form.get("user", "").strip()
        if not selector or admin_views.find_user(users.users, selector) is None:
            raise Refused(
                404,
                "No such user",
                f"There is no user {selector[:80]!r} in the users file.",
                "Go back to the users list and pick one from it.",
            )
        return selector

    async def block(who: Admin, form: dict[str, str]) -> str:
        selector = known_user(form)
        blocked = form.get("blocked") == "1"
        if blocked and admin_views.find_user(users.users, selector) == who.user:
            raise Refused(
                400,
                "You cannot block yourself",
                "Blocking your own account would lock you out of this page.",
                "Ask another admin, or use `remotellm-broker users block` on the server.",
            )
        await asyncio.to_thread(users.set_blocked, selector, blocked)
        target = admin_views.find_user(users.users, selector)
        if blocked and target is not None:
            await portal.end_sessions(target.gitlab_id, "blocked")
        return "blocked" if blocked else "unblocked"

    async def revoke_key(who: Admin, form: dict[str, str]) -> str:
        selector = known_user(form)
        await asyncio.to_thread(users.revoke, selector, form.get("key", ""))
        target = admin_views.find_user(users.users, selector)
        if target is not None:  # whoever holds the key may hold the login too
            await portal.end_sessions(target.gitlab_id, "key revoked")
        return "revoked-key"

    async def set_limits(who: Admin, form: dict[str, str]) -> str:
        selector = known_user(form)
        values = admin_views.parse_limits(form)
        await asyncio.to_thread(users.set_limits, selector, values, replace=True)
        return "limits"

    async def approve(who: Admin, form: dict[str, str]) -> str:
        store = admin_actions.store_of(state)
        await asyncio.to_thread(store.approve, form.get("id", ""), who.user.username)
        return "approved"

    async def reject(who: Admin, form: dict[str, str]) -> str:
        store = admin_actions.store_of(state)
        await asyncio.to_thread(store.reject, form.get("id", ""), who.user.username)
        return "rejected"

    async def revoke(who: Admin, form: dict[str, str]) -> str:
        await admin_actions.revoke_connector(state, form.get("id", ""), who.user.username)
        return "revoked"

    async def llm_key(who: Admin, form: dict[str, str]) -> str:
        store = admin_actions.store_of(state)
        await asyncio.to_thread(store.set_llm_key, form.get("id", ""), form.get("llm_api_key"))
        return "llm-key"

    form_action("/portal/admin/users/block", "/portal/admin/users", block)
    form_action("/portal/admin/users/revoke-key", "/portal/admin/users", revoke_key)
    form_action("/portal/admin/users/limits", "/portal/admin/users", set_limits)
    form_action("/portal/admin/enrollments/approve", "/portal/admin/connectors", approve)
    form_action("/portal/admin/enrollments/reject", "/portal/admin/connectors", reject)
    form_action("/portal/admin/enrollments/revoke", "/portal/admin/connectors", revoke)
    form_action("/portal/admin/enrollments/llm-key", "/portal/admin/connectors", llm_key)
    return bp


_USAGE_TODO = "Pick 1d, 7d or 30d, or give dates as YYYY-MM-DD with from before to."
_LOG_TODO = "Clear the filter, or give a status as a number such as 200 or 429."


def _entries(portal: Portal) -> list[Enrolled]:
    store = portal.state.enrollment
    return store.entries if store is not None else []


def _back(path: str) -> str:
    return f"Go back to {path} and reload it: it shows what can be done now."
