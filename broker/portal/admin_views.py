"""What the operator's pages show, as plain rows built from the broker's state.

Read-only: the relay core's sessions and queues, the users file, the enrollment store.
Nothing here changes state or does I/O; ``now`` is passed in (the hub's clock).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from broker.accounts.enrollment import Enrolled
from broker.accounts.users import KeyActionRefused, KeyEntry, LimitsEntry, UserEntry, UsersStore
from broker.core.aliases import serves
from broker.core.limits import LIMIT_FIELDS, UNLIMITED, Limits, Override, SubjectUsage
from broker.state.relay import RelayView, Waiting
from shared.protocol import EnrollStatus


@dataclass(frozen=True, slots=True)
class KeyRow:
    name: str
    prefix: str
    created: datetime
    last_used: datetime | None
    models: list[str] | None = None
    expires: datetime | None = None
    label: str | None = None
    expired: bool = False


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
    limits: dict[str, str]  # the overrides as the form shows them ("" = the default)


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


def key_row(users: UsersStore, key: KeyEntry, now: float) -> KeyRow:
    return KeyRow(
        key.name,
        key.prefix,
        key.created,
        users.last_used(key),
        key.models,
        key.expires,
        key.label,
        key.is_expired(now),
    )


def user_rows(users: UsersStore, now: float, query: str = "") -> list[UserRow]:
    rows = []
    needle = query.strip().lower()
    for user in sorted(users.users, key=lambda u: u.username.lower()):
        if needle and needle not in user.username.lower() and needle not in user.name.lower():
            continue
        keys = [key_row(users, k, now) for k in user.keys]
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
                limits=limit_values(user.limits),
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
    view: RelayView,
    poll_modes: dict[str, str],
    enrolled: list[Enrolled],
) -> list[SessionRow]:
    labels = {e.id: f"enrolled: {e.name}" for e in enrolled}
    rows = []
    for s in sorted(view.sessions.values(), key=lambda s: (s.name, s.owner)):
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
                in_flight=s.active,
                served=s.served,
                version=s.version,
                seen="polling now" if s.polling else _ago(s.idle_s),
            )
        )
    return rows


def queue_rows(
    view: RelayView, queued: dict[str, list[Waiting]], names: dict[str, str]
) -> list[QueueRow]:
    """Every model that is live or has waiting requests, busiest first (an alias's pinned
    route, ``model#connector``, is a row of its own: only that connector serves it)."""
    models = set(view.live_models) | {m for m, q in queued.items() if q}
    rows = []
    for model in models:
        waiting = queued.get(model, [])
        per_user = Counter(names.get(p.user or "", p.user or "anonymous") for p in waiting)
        serving = [s for s in view.sessions.values() if serves(model, s.models, s.name)]
        rows.append(
            QueueRow(
                model=model,
                depth=len(waiting),
                waiting=per_user.most_common(),
                oldest_s=max((p.waited_s for p in waiting), default=0.0),
                connectors=len(serving),
                free_slots=sum(s.free for s in serving),
                slot_waits=view.slot_waits.get(model, 0),
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


LIMIT_LABELS = {
    "rpm": "requests / min",
    "tpm": "tokens / min",
    "concurrency": "at once",
    "daily_tokens": "tokens / day",
    "monthly_tokens": "tokens / month",
}


def limit_values(entry: LimitsEntry | None) -> dict[str, str]:
    values = entry.model_dump() if entry is not None else {}
    return {name: "" if values.get(name) is None else str(values[name]) for name in LIMIT_FIELDS}


def default_values(limits: Limits) -> dict[str, str]:
    return {
        name: "unlimited" if getattr(limits, name) is None else str(getattr(limits, name))
        for name in LIMIT_FIELDS
    }


def parse_limits(form: dict[str, str]) -> dict[str, Override]:
    """The limits form: empty = the broker's default, a whole number >= 1, or unlimited."""
    values: dict[str, Override] = {}
    for name in LIMIT_FIELDS:
        text = form.get(name, "").strip().lower().replace("_", "").replace(",", "")
        if not text:
            values[name] = None
        elif text == "unlimited":
            values[name] = UNLIMITED
        elif text.isdigit() and 1 <= int(text) <= 10**15:
            values[name] = int(text)
        else:
            raise KeyActionRefused(
                f"{LIMIT_LABELS[name]}: {form.get(name, '')[:40]!r} is not a limit. Give a whole "
                "number of at least 1, 'unlimited', or leave it empty for the broker's default."
            )
    return values


@dataclass(frozen=True, slots=True)
class LimitedRow:
    subject: str
    who: str
    in_flight: int
    requests_last_minute: int
    tokens_last_minute: int
    tokens_today: int
    tokens_this_month: int
    refusals: int
    last_refused: str  # "12 s ago" or "-"
    reason: str
    limited_now: bool


def limited_rows(
    found: list[SubjectUsage], now: float, names: dict[str, str], within: float = 60.0
) -> list[LimitedRow]:
    """Subjects the limiter knows, the recently refused first (a refusal within ``within``
    seconds counts as "limited now")."""
    rows = []
    for u in found:
        user, _, key = u.subject.partition("/")
        who = names.get(user, user) + (f" / {key}" if key else "")
        recent = u.last_refused is not None and now - u.last_refused <= within
        rows.append(
            LimitedRow(
                subject=u.subject,
                who=who,
                in_flight=u.in_flight,
                requests_last_minute=u.requests_last_minute,
                tokens_last_minute=u.tokens_last_minute,
                tokens_today=u.tokens_today,
                tokens_this_month=u.tokens_this_month,
                refusals=u.refusals,
                last_refused=_ago(now - u.last_refused) if u.last_refused is not None else "-",
                reason=u.last_reason.value if u.last_reason is not None else "-",
                limited_now=recent,
            )
        )
    return sorted(rows, key=lambda r: (not r.limited_now, -r.refusals, r.who))
