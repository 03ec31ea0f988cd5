"""``PortalContext``: everything the portal's routes need, built once by the composition root.

``broker.composition`` builds it (users store, cookies, GitLab OAuth, the OpenID Connect
providers, the session store it picked) and stores it on the app; a route gets it with
``portal_context()``.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from quart import Quart, current_app, request

from broker.accounts.identities import is_oidc_user_id
from broker.accounts.users import UserEntry, UsersStore
from broker.broker_state import BrokerState
from broker.portal.oauth import GitLabOAuth, LoginFailed
from broker.portal.session import SESSION_COOKIE, Cookies, Session
from broker.state.portal_sessions import SessionRecord, Sessions
from shared.logging import get_logger

if TYPE_CHECKING:  # httpx and joserfc load only with a provider configured
    from broker.chat import Chat
    from broker.portal.oidc import OidcLogin

log = get_logger("broker.portal")

EXTENSION = "remotellm_portal"
REVEAL_FOR = 300.0
GROUP_RETRY = 60.0  # seconds before a group check GitLab could not answer is tried again


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
class PortalContext:
    state: BrokerState
    users: UsersStore
    cookies: Cookies
    oauth: GitLabOAuth | None
    sessions: Sessions
    oidc: dict[str, OidcLogin] = field(default_factory=dict)  # by provider name, in order
    reveals: Reveals = field(default_factory=Reveals)
    chat: Chat | None = None  # with the portal on (broker.composition)

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
        if is_oidc_user_id(record.gitlab_id):
            return True  # checked at login; the session ends within --session-lifetime
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


def attach_context(app: Quart, context: PortalContext) -> None:
    app.extensions[EXTENSION] = context


def portal_context() -> PortalContext:
    """The app's portal context (inside a request)."""
    context = current_app.extensions[EXTENSION]
    assert isinstance(context, PortalContext)
    return context
