"""What the operator's pages show, as plain rows built from the broker's state.

Read-only: the relay core's sessions and queues, the users file, the enrollment store.
Nothing here changes state or does I/O; ``now`` is passed in (the hub's clock).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from broker.core import RelayCore
from broker.enrollment import Enrolled
from broker.users import UserEntry, UsersStore
from shared.protocol import EnrollStatus


@dataclass(frozen=True, slots=True)
class KeyRow:
    name: str
    prefix: str
    created: datetime
    last_used: datetime | None


@dataclass(frozen=True, slots=True)
class UserRow:
    username: str
    gitlab_id: int
    user_id: str
    name: str
    blocked: bool
    keys: list[KeyRow]
    last_used: datetime | None
    last_login: datetime | None


@dataclass(frozen=True, slots=True)
class SessionRow:
    name: str
    identity: str
    identity_label: str
    models: list[str]
    capacity: int
    capacity_source: str
    upload_mode: str
    poll_mode: str
    in_flight: int
    served: int
    version: str
    seen: str  # "polling now", "3 s ago"


@dataclass(frozen=True, slots=True)
class QueueRow:
    model: str
    depth: int
    waiting: list[tuple[str, int]]  # (user, requests), most first
    oldest_s: float
    connectors: int
    free_slots: int
    slot_waits: int


def user_rows(users: UsersStore, query: str = "") -> list[UserRow]:
    rows = []
    needle = query.strip().lower()
    for user in sorted(users.users, key=lambda u: u.username.lower()):
        if needle and needle not in user.username.lower() and needle not in user.name.lower():
            continue
        keys = [KeyRow(k.name, k.prefix, k.created, users.last_used(k)) for k in user.keys]
        used = [k.last_used for k in keys if k.last_used is not None]
        rows.append(
            UserRow(
                username=user.username,
                gitlab_id=user.gitlab_id,
                user_id=user.user_id,
                name=user.name,
                blocked=user.blocked,
                keys=keys,
                last_used=max(used) if used else None,
                last_login=user.last_login,
            )
        )
    return rows


def find_user(users: list[UserEntry], selector: str) -> UserEntry | None:
    """A user by GitLab username or numeric id, as the users CLI names them."""
    return next((u for u in users if selector in (u.username, str(u.gitlab_id))), None)


def usernames(users: list[UserEntry]) -> dict[str, str]:
    """Usage and queues name users by id (``gitlab-42``): the username to show instead."""
    return {u.user_id: u.username for u in users}


def _ago(seconds: float) -> str:
    if seconds < 1:
        return "just now"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    return f"{seconds / 60:.0f} min ago"


def session_rows(
    core: RelayCore,
    now: float,
    poll_modes: dict[str, str],
    enrolled: list[Enrolled],
) -> list[SessionRow]:
    labels = {e.id: f"enrolled: {e.name}" for e in enrolled}
    rows = []
    for s in sorted(core.sessions.values(), key=lambda s: (s.name, s.owner)):
        rows.append(
            SessionRow(
                name=s.name,
                identity=s.owner,
                identity_label=labels.get(s.owner, "token"),
                models=sorted(s.models),
                capacity=s.capacity,
                capacity_source=s.capacity_source,
                upload_mode=s.upload_mode.value,
                poll_mode=poll_modes.get(s.id, "-"),
                in_flight=len(s.active),
                served=s.served,
                version=s.version,
                seen="polling now" if s.polling else _ago(now - s.last_seen),
            )
        )
    return rows


def queue_rows(core: RelayCore, now: float, names: dict[str, str]) -> list[QueueRow]:
    """Every model that is live or has waiting requests, busiest first."""
    live = core.live_models()
    models = set(live) | {m for m, q in core.queues.items() if q}
    rows = []
    for model in models:
        queue = core.queues.get(model)
        waiting = list(queue) if queue else []
        per_user = Counter(names.get(p.user or "", p.user or "anonymous") for p in waiting)
        serving = [s for s in core.sessions.values() if model in s.models]
        rows.append(
            QueueRow(
                model=model,
                depth=len(waiting),
                waiting=per_user.most_common(),
                oldest_s=max((now - p.created for p in waiting), default=0.0),
                connectors=len(serving),
                free_slots=sum(s.free for s in serving),
                slot_waits=core.slot_waits.get(model, 0),
            )
        )
    return sorted(rows, key=lambda r: (-r.depth, r.model))


def enrollment_groups(entries: list[Enrolled]) -> dict[str, list[Enrolled]]:
    """Pending first (oldest first), then approved, then the decided-against history."""
    groups: dict[str, list[Enrolled]] = {"pending": [], "approved": [], "closed": []}
    for e in sorted(entries, key=lambda e: e.requested):
        if e.status is EnrollStatus.PENDING:
            groups["pending"].append(e)
        elif e.status is EnrollStatus.APPROVED:
            groups["approved"].append(e)
        else:
            groups["closed"].append(e)
    return groups
