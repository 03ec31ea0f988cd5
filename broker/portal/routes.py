"""The portal's routes under /portal/: login with GitLab, keys, playground, connect."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import quote

import httpx
from quart import Blueprint, Response, request

from broker.accounts.users import KeyActionRefused, UserEntry, UsersFileError, UsersStore
from broker.broker_state import BrokerState
from broker.portal import pages
from broker.portal.csrf import FORM_FIELD, HEADER, csrf_ok, csrf_token
from broker.portal.form_limits import install_form_limits
from broker.portal.oauth import (
    CODE_REFUSED,
    DENIED,
    GITLAB_DOWN,
    NOT_IN_GROUP,
    STATE_MISMATCH,
    GitLabOAuth,
    LoginFailed,
)
from broker.portal.security import add_security_headers, safe_next
from broker.portal.session import (
    FLOW_COOKIE,
    SESSION_COOKIE,
    Cookies,
    Session,
    load_session_secret,
)
from broker.portal.usage_view import usage_for
from broker.state.memory.portal_sessions import SessionStore
from broker.state.portal_sessions import SessionRecord, Sessions
from broker.state.redis import RedisRelayState
from broker.state.redis.portal_sessions import RedisSessions
from shared.logging import get_logger

log = get_logger("broker.portal")

FLUSH_EVERY = 15.0
REVEAL_FOR = 300.0
PLAYGROUND_KEY = "playground"
GROUP_RETRY = 60.0  # seconds before a group check GitLab could not answer is tried again

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


@dataclass
class Reveals:
    """New secrets waiting to be shown once (kept in memory, never in a cookie or URL)."""

    entries: dict[str, tuple[int, str, str, float]] = field(default_factory=dict)

    def put(self, gitlab_id: int, name: str, secret: str) -> str:
        now = time.monotonic()
        for tok in [t for t, e in self.entries.items() if e[3] < now]:
            del self.entries[tok]
        token = secrets.token_urlsafe(16)
        self.entries[token] = (gitlab_id, name, secret, now + REVEAL_FOR)
        return token

    def take(self, token: str | None, gitlab_id: int) -> tuple[str, str] | None:
        entry = self.entries.get(token or "")
        if entry is None or entry[0] != gitlab_id or entry[3] < time.monotonic():
            return None
        del self.entries[token or ""]
        return entry[1], entry[2]


@dataclass
class Portal:
    state: BrokerState
    users: UsersStore
    cookies: Cookies
    oauth: GitLabOAuth | None
    sessions: Sessions
    reveals: Reveals = field(default_factory=Reveals)

    @property
    def base_url(self) -> str:
        return self.state.settings.advertised_url + "/v1"

    def is_admin(self, user: UserEntry) -> bool:
        """By numeric GitLab id; by username only if the operator still uses --admin."""
        settings = self.state.settings
        return user.gitlab_id in settings.admin_ids or user.username in settings.admins

    async def session(self) -> Session | None:
        """The request's live session: a signed cookie naming a session kept here."""
        cookie = self.cookies.session(request.cookies.get(SESSION_COOKIE))
        if cookie is None:
            return None
        record = await self.sessions.get(cookie.sid, cookie.gitlab_id)
        if record is None:
            return None
        if not await self._still_in_group(record):
            await self.sessions.end(record.sid, record.gitlab_id)
            return None
        return cookie

    async def _still_in_group(self, record: SessionRecord) -> bool:
        oauth = self.oauth
        interval = self.state.settings.group_check_interval
        now = self.sessions.clock()
        if oauth is None or not oauth.allowed_groups or now - record.checked < interval:
            return True
        if record.tokens is None:
            return False
        if now < record.retry_at:
            return True
        record.retry_at = now + GROUP_RETRY  # one check at a time per session
        await self.sessions.save(record)
        try:
            allowed, record.tokens = await oauth.recheck(record.tokens)
        except LoginFailed:
            # GitLab cannot answer: keep the session a while, never past two intervals.
            log.warning("portal_group_check_failed", gitlab_id=record.gitlab_id)
            return now - record.checked < 2 * interval
        if not allowed:
            log.info("portal_group_left", gitlab_id=record.gitlab_id)
            return False
        record.checked, record.retry_at = now, 0.0
        await self.sessions.save(record)
        return True

    async def end_sessions(self, gitlab_id: int, why: str) -> None:
        ended = await self.sessions.end_user(gitlab_id)
        if ended:
            log.info("portal_sessions_ended", gitlab_id=gitlab_id, sessions=ended, why=why)


@dataclass(frozen=True, slots=True)
class Viewer:
    session: Session
    user: UserEntry
    csrf: str


def create_portal_blueprint(portal: Portal) -> Blueprint:
    bp = Blueprint("portal", __name__)
    users = portal.users
    cookies = portal.cookies
    background: list[asyncio.Task[None]] = []
    install_form_limits(bp, portal.state.settings)

    @bp.before_app_serving
    async def start() -> None:
        interval = portal.state.settings.users_reload_interval
        background.append(asyncio.create_task(_maintain(users, interval), name="portal-users"))

    @bp.after_app_serving
    async def stop() -> None:
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(users.flush_last_used)
        if portal.oauth is not None:
            await portal.oauth.http.aclose()

    @bp.after_request
    async def headers(response: Response) -> Response:
        return add_security_headers(response)

    async def viewer() -> Viewer | Response:
        session = await portal.session()
        user = users.user(session.gitlab_id) if session else None
        if session is None or user is None:
            target = request.full_path.rstrip("?") if request.method == "GET" else ""
            query = f"?next={_quote(target)}" if target else ""
            return _redirect("/portal/" + query, 303)
        if user.blocked:
            await portal.end_sessions(user.gitlab_id, "blocked")
            return pages.page("blocked", 403, user=user, csrf="")
        return Viewer(session, user, csrf_token(cookies.secret, session))

    def failure(kind: str, detail: str = "") -> Response:
        status, title, what, todo = FAILURES[kind]
        log.info("portal_login_failed", reason=kind, detail=detail)
        response = pages.page("error", status, title=title, what=what, todo=todo, retry=True)
        response.delete_cookie(FLOW_COOKIE, path="/portal")
        return response

    async def form_checked(who: Viewer) -> dict[str, str] | Response:
        form = await request.form
        if not csrf_ok(cookies.secret, who.session, form.get(FORM_FIELD)):
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

    @bp.get("/portal/")
    async def home() -> Response:
        session = await portal.session()
        nxt = safe_next(request.args.get("next"))
        if session is not None and users.user(session.gitlab_id) is not None:
            return _redirect(nxt, 303)
        return pages.page(
            "login",
            configured=portal.oauth is not None,
            next=nxt,
            gitlab_url=portal.state.settings.gitlab_url,
            checks_groups=bool(portal.state.settings.gitlab_allowed_groups),
            login_url="/portal/login?next=" + _quote(nxt),
        )

    @bp.get("/portal/login")
    async def login() -> Response:
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
        response = _redirect(url, 302)
        response.set_cookie(**cookies.flow_cookie(flow).header_kwargs())
        return response

    @bp.get("/portal/callback")
    async def callback() -> Response:
        flow = cookies.flow(request.cookies.get(FLOW_COOKIE))
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
            result = await asyncio.to_thread(users.login, gitlab.id, gitlab.username, gitlab.name)
        except LoginFailed as exc:
            return failure(exc.kind, exc.detail)
        except UsersFileError as exc:
            log.error("portal_users_file_broken", error=str(exc))
            return _users_file_broken()
        log.info(
            "portal_login",
            user=gitlab.username,
            gitlab_id=gitlab.id,
            first=result.first_key is not None,
        )
        if gitlab.username in portal.state.settings.admins:
            log.warning(
                "admin_by_username",
                user=gitlab.username,
                gitlab_id=gitlab.id,
                todo=f"replace --admin {gitlab.username} by --admin-id {gitlab.id}",
            )
        record = await portal.sessions.create(gitlab.id, gitlab.tokens)
        _, spec = cookies.new_session(gitlab.id, record.sid)
        target = flow.next
        if result.first_key is not None:
            token = portal.reveals.put(gitlab.id, "default", result.first_key)
            target = f"/portal/keys?reveal={token}"
        response = _redirect(target, 303)
        response.set_cookie(**spec.header_kwargs())
        response.delete_cookie(FLOW_COOKIE, path="/portal")
        return response

    @bp.post("/portal/logout")
    async def logout() -> Response:
        who = await viewer()
        if isinstance(who, Viewer):
            form = await form_checked(who)
            if isinstance(form, Response):
                return form
            await portal.sessions.end(who.session.sid, who.user.gitlab_id)
            log.info("portal_logout", user=who.user.username)
        response = _redirect("/portal/", 303)
        response.delete_cookie(SESSION_COOKIE, path="/portal")
        return response

    async def keys_page(
        who: Viewer, reveal: tuple[str, str] | None = None, error: str = "", status: int = 200
    ) -> Response:
        models = await pages.live_models(portal.state)
        settings = portal.state.settings
        usage_path = settings.usage_path if settings.record_usage else None
        rows = [(k, users.last_used(k)) for k in who.user.keys]
        return pages.page(
            "keys",
            status,
            user=who.user,
            csrf=who.csrf,
            is_admin=portal.is_admin(who.user),
            keys=rows,
            reveal=reveal,
            error=error,
            models=models,
            base_url=portal.base_url,
            examples=pages.examples(
                portal.base_url, models[0] if models else "MODEL", reveal[1] if reveal else None
            ),
            usage=await usage_for(usage_path, who.user.user_id, portal.state.prices),
            prices=portal.state.prices,
        )

    @bp.get("/portal/keys")
    async def keys() -> Response:
        who = await viewer()
        if isinstance(who, Response):
            return who
        reveal = portal.reveals.take(request.args.get("reveal"), who.user.gitlab_id)
        return await keys_page(who, reveal=reveal)

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
            if action == "create":
                secret = await asyncio.to_thread(users.create_key, uid, name)
            elif action == "regenerate":
                secret = await asyncio.to_thread(users.regenerate_key, uid, name)
            else:
                await asyncio.to_thread(users.delete_key, uid, name)
                secret = ""
        except KeyActionRefused as exc:
            return await keys_page(who, error=str(exc), status=400)
        except UsersFileError as exc:
            log.error("portal_users_file_broken", error=str(exc))
            return _users_file_broken()
        log.info("portal_key_changed", action=action, user=who.user.username, key=name)
        if not secret:
            return _redirect("/portal/keys", 303)
        token = portal.reveals.put(uid, name.strip(), secret)
        return _redirect(f"/portal/keys?reveal={token}", 303)

    @bp.post("/portal/keys")
    async def create_key() -> Response:
        return await key_action("create")

    @bp.post("/portal/keys/regenerate")
    async def regenerate_key() -> Response:
        return await key_action("regenerate")

    @bp.post("/portal/keys/delete")
    async def delete_key() -> Response:
        return await key_action("delete")

    @bp.get("/portal/playground")
    async def playground() -> Response:
        who = await viewer()
        if isinstance(who, Response):
            return who
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
        session = await portal.session()
        user = users.user(session.gitlab_id) if session else None
        if session is None or user is None:
            return _json({"error": "not logged in"}, 401)
        if user.blocked:
            return _json({"error": "this user is blocked"}, 403)
        if not csrf_ok(cookies.secret, session, request.headers.get(HEADER)):
            return _json({"error": "bad CSRF token; reload the page"}, 403)
        try:
            secret = await asyncio.to_thread(
                users.regenerate_key, user.gitlab_id, PLAYGROUND_KEY, True
            )
        except (KeyActionRefused, UsersFileError) as exc:
            return _json({"error": str(exc)}, 409)
        log.info("portal_key_changed", action="playground", user=user.username)
        return _json({"key": secret, "name": PLAYGROUND_KEY}, 200)

    @bp.get("/portal/connect")
    async def connect() -> Response:
        session = await portal.session()
        user = users.user(session.gitlab_id) if session else None
        return pages.page(
            "connect",
            user=user,
            csrf=csrf_token(cookies.secret, session) if session else "",
            command=pages.connector_command(portal.state.settings.advertised_url),
            models=await pages.live_models(portal.state),
        )

    @bp.get("/portal/static/<name>")
    async def static(name: str) -> Response:
        found = pages.static_file(name)
        if found is None:
            return Response("not found", status=404, content_type="text/plain")
        return found

    @bp.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
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

    return bp


def _users_file_broken() -> Response:
    return pages.page(
        "error",
        503,
        title="The portal cannot save right now",
        what="The broker's users file is damaged, so changes cannot be saved. Keys keep working.",
        todo="Tell the operator; the broker's log says what is wrong with the file.",
        retry=False,
    )


def _redirect(location: str, status: int) -> Response:
    return Response("", status=status, headers={"Location": location})


def _json(body: dict[str, str], status: int) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def _quote(value: str) -> str:
    return quote(value, safe="/")


async def _maintain(users: UsersStore, interval: float) -> None:
    """Reload the users file when it changes; write last-used times in batches."""
    since_flush = 0.0
    while True:
        await asyncio.sleep(interval)
        await asyncio.to_thread(users.reload)
        since_flush += interval
        if since_flush >= FLUSH_EVERY:
            since_flush = 0.0
            await asyncio.to_thread(users.flush_last_used)


def build_portal(state: BrokerState) -> Portal:
    settings = state.settings
    users = UsersStore(settings.users_path)
    state.keys.attach_users(users.lookup)
    if state.revocations is not None:
        users.watch(state.revocations.note)
    # Nothing to sign with the portal off: do not leave a secret file in the data dir then.
    secret = (
        load_session_secret(settings.session_secret, settings.data_dir)
        if settings.portal_enabled
        else secrets.token_urlsafe(32)
    )
    cookies = Cookies(
        secret, settings.session_lifetime, settings.advertised_url.startswith("https://")
    )
    oauth = None
    if settings.gitlab_client_id:
        oauth = GitLabOAuth(
            base_url=settings.gitlab_url,
            client_id=settings.gitlab_client_id,
            client_secret=settings.gitlab_client_secret,
            redirect_uri=settings.advertised_url + "/portal/callback",
            allowed_groups=settings.gitlab_allowed_groups,
            http=httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=5.0)),
        )
    if settings.admins:
        log.warning(
            "admin_by_username",
            usernames=settings.admins,
            todo="GitLab users can change their username: name admins with --admin-id "
            "(the numeric id; the login log line of each admin names it)",
        )
    if oauth is not None and not oauth.allowed_groups:
        log.warning("portal_open_to_any_gitlab_user", gitlab_url=settings.gitlab_url)
    sessions: Sessions = SessionStore(settings.session_lifetime, settings.session_idle)
    if isinstance(state.relay, RedisRelayState):  # brokers share state: share sessions too
        sessions = RedisSessions(
            state.relay.redis,
            settings.redis_prefix,
            settings.session_lifetime,
            settings.session_idle,
        )
    return Portal(state=state, users=users, cookies=cookies, oauth=oauth, sessions=sessions)
