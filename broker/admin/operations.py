"""Every change an operator or a user makes, in one place, each one audited.

The admin pages (``broker/portal/admin_*.py``), the user's keys page, the CLI
(``remotellm-broker users``, ``admin-tokens``) and the admin API (``broker.admin.api``)
call these and nothing else to change the users file, the enrolled connectors or the admin
tokens. Each takes the ``Actor`` (who, from which address), does the change through the
store (which validates it), and appends one entry to the audit log
(``broker.usage.audit``) with what changed, never a secret. The methods block on the disk:
callers on the event loop run them in a thread (``run``). What a change means for the live
relay (a revoked connector's sessions end) is done by the async functions at the end,
which the pages and the API share.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from broker.accounts.admin_tokens import AdminToken, AdminTokenStore, Scope
from broker.accounts.enrollment import Enrolled, EnrollmentError, EnrollmentStore
from broker.accounts.key_scope import ScopeAsk
from broker.accounts.users import KeyActionRefused, KeyEntry, UserEntry, UsersStore
from broker.core import UnknownSession
from broker.core.limits import Override
from broker.usage.audit import AuditEntry, AuditLog
from shared.logging import get_logger

if TYPE_CHECKING:
    from broker.broker_state import BrokerState

log = get_logger("broker.admin")

T = TypeVar("T")
Verdict = Literal["approve", "reject", "revoke"]


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change and from where (None: on the broker's own host)."""

    who: str
    address: str | None = None

    @classmethod
    def portal(cls, user_id: str, address: str | None) -> Actor:
        return cls(f"portal:{user_id}", address)

    @classmethod
    def token(cls, token_id: str, address: str | None) -> Actor:
        return cls(f"admin-token:{token_id}", address)

    @classmethod
    def cli(cls) -> Actor:
        try:
            name = getpass.getuser()
        except (KeyError, OSError):  # no name for this uid (a bare container)
            name = "unknown"
        return cls(f"cli:{name}", None)


def key_facts(key: KeyEntry) -> dict[str, Any]:
    """What the audit log says of a key: its name and prefix, never its hash."""
    return {"key": key.name, "prefix": key.prefix}


class Operations:
    """The changes, over the stores they change; ``audit`` records each one."""

    def __init__(
        self,
        users: UsersStore,
        enrollment: EnrollmentStore | None,
        audit: AuditLog,
        tokens: AdminTokenStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.users, self.enrollment, self.audit, self.tokens = users, enrollment, audit, tokens
        self._clock = clock

    def record(self, actor: Actor, action: str, target: str, **details: Any) -> None:
        """Append the entry; a database that cannot be written is logged loudly with the
        entry itself, and the change (already made) stands."""
        entry = AuditEntry(self._clock(), actor.who, actor.address, action, target, details)
        try:
            self.audit.append(entry)
        except (sqlite3.Error, OSError) as exc:
            log.error("audit_write_failed", error=str(exc), **entry.as_json())

    # -- users ------------------------------------------------------------------------------

    def _username(self, selector: str) -> str:
        found = next(
            (u for u in self.users.users if selector in (u.username, str(u.gitlab_id))), None
        )
        return found.username if found is not None else selector

    def set_blocked(self, actor: Actor, selector: str, blocked: bool) -> UserEntry:
        user = self.users.set_blocked(selector, blocked)
        action = "user.block" if blocked else "user.unblock"
        self.record(actor, action, user.username, gitlab_id=user.gitlab_id)
        return user

    def revoke_key(self, actor: Actor, selector: str, key: str) -> KeyEntry:
        entry = self.users.revoke(selector, key)
        self.record(actor, "key.revoke", self._username(selector), **key_facts(entry))
        return entry

    def set_limits(
        self,
        actor: Actor,
        selector: str,
        values: dict[str, Override],
        *,
        key: str | None = None,
        replace: bool = False,
    ) -> UserEntry:
        user = self.users.set_limits(selector, values, key=key, replace=replace)
        self.record(actor, "limits.set", user.username, key=key, replace=replace, limits=values)
        return user

    def set_scope(self, actor: Actor, selector: str, key: str, ask: ScopeAsk) -> KeyEntry:
        """Any key's models, expiry or label (an operator: no allowance or cap applies)."""
        entry = self.users.set_scope(selector, key, ask)
        facts = {**key_facts(entry), "models": entry.models, "expires": entry.expires}
        self.record(actor, "key.scope", self._username(selector), **facts, label=entry.label)
        return entry

    def set_group_defaults(
        self,
        actor: Actor,
        group: str,
        models: str | None,
        lifetime: str | None,
        *,
        remove: bool = False,
    ) -> None:
        """A group's key defaults: the models its members' keys may use, their lifetime."""
        self.users.set_group_defaults(group, models, lifetime, remove=remove)
        action = "key_defaults.remove" if remove else "key_defaults.set"
        self.record(actor, action, group, models=models, lifetime=lifetime)

    def own_key_changed(self, actor: Actor, user: UserEntry, action: str, name: str) -> None:
        """Record a user's change to their own key (made by the keys page)."""
        key = user.key(name.strip())
        facts = key_facts(key) if key else {"key": name.strip()[:64]}
        self.record(actor, f"key.{action}", user.username, **facts)

    # -- connectors -------------------------------------------------------------------------

    def _enrollment(self) -> EnrollmentStore:
        if self.enrollment is None:
            raise EnrollmentError(404, "enrollment is not set up on this broker", "not_found")
        return self.enrollment

    def decide(self, actor: Actor, verdict: Verdict, entry_id: str) -> Enrolled:
        store = self._enrollment()
        decide = {"approve": store.approve, "reject": store.reject, "revoke": store.revoke}
        entry = decide[verdict](entry_id, actor.who)
        self.record(actor, f"connector.{verdict}", entry.id, name=entry.name)
        return entry

    def set_llm_key(self, actor: Actor, entry_id: str, key: str | None) -> Enrolled:
        entry = self._enrollment().set_llm_key(entry_id, key)
        self.record(actor, "connector.llm_key", entry.id, name=entry.name, set=bool(key))
        return entry

    # -- admin tokens -----------------------------------------------------------------------

    def create_admin_token(self, actor: Actor, scope: Scope, label: str) -> tuple[str, AdminToken]:
        secret, token = self.tokens.create(scope, label, actor.who)
        self.record(actor, "admin_token.create", token.id, scope=scope, label=label)
        return secret, token

    def revoke_admin_token(self, actor: Actor, token_id: str) -> AdminToken:
        token = self.tokens.revoke(token_id)
        self.record(actor, "admin_token.revoke", token.id, label=token.label)
        return token


async def run(change: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """An operation from the event loop: in a worker thread (it writes files and SQLite)."""
    return await asyncio.to_thread(change, *args, **kwargs)


async def end_sessions(state: BrokerState, identity: str) -> int:
    """End every live session of a connector identity (its token no longer works)."""
    view = await state.relay.view()
    ids = [s.id for s in view.sessions.values() if s.owner == identity]
    for session_id in ids:
        with contextlib.suppress(UnknownSession):  # it ended meanwhile
            await state.relay.deregister(identity, session_id)
    return len(ids)


async def decide_connector(
    state: BrokerState, actor: Actor, verdict: Verdict, entry_id: str
) -> Enrolled:
    """Approve, reject or revoke an enrollment; a revoked connector's sessions end."""
    entry = await run(operations_of(state).decide, actor, verdict, entry_id)
    if verdict == "revoke":
        ended = await end_sessions(state, entry.id)
        log.info("connector_revoked", enrollment=entry.id, connector=entry.name, sessions=ended)
    return entry


def operations_of(state: BrokerState) -> Operations:
    """The broker's operations (built with its state; built here for a bare test state)."""
    if state.operations is None:
        state.operations = build_operations(
            state.users,
            state.enrollment,
            state.settings.usage_path,
            state.settings.admin_tokens_path,
        )
    return state.operations


def build_operations(
    users: UsersStore, enrollment: EnrollmentStore | None, usage_path: Path, tokens_path: Path
) -> Operations:
    return Operations(users, enrollment, AuditLog(usage_path), AdminTokenStore(tokens_path))


__all__ = ["Actor", "KeyActionRefused", "Operations", "decide_connector", "operations_of", "run"]
