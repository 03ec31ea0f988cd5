"""What one reload of the users file changed, as far as access goes (revoked keys, blocked
and unblocked users, keys whose scope changed): the users store computes it, the revocation
board publishes it.

Apart from ``broker.accounts.revocations`` so that a broker without Redis never loads
redis-py (the users store needs this, the board needs Redis).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class BoardScope:
    """A key's models (None: every model) and expiry (epoch seconds, None: never)."""

    models: frozenset[str] | None = None
    expires: float | None = None

    def dumps(self, at: float) -> str:
        models = None if self.models is None else sorted(self.models)
        return json.dumps({"models": models, "expires": self.expires, "at": at})


def parse_scope(raw: bytes | str) -> BoardScope | None:
    """A board entry, or None when it is not one (written by something else: ignored)."""
    try:
        doc = json.loads(raw)
        models, expires = doc["models"], doc["expires"]
    except (ValueError, TypeError, KeyError):
        return None
    if models is not None and not (
        isinstance(models, list) and all(isinstance(m, str) for m in models)
    ):
        return None
    if expires is not None and not isinstance(expires, int | float):
        return None
    return BoardScope(None if models is None else frozenset(models), expires)


def scope_changes(
    before: Mapping[str, BoardScope], after: Mapping[str, BoardScope]
) -> dict[str, BoardScope]:
    """The keys in both loads whose scope changed (new keys are nobody else's yet)."""
    return {d: s for d, s in after.items() if d in before and before[d] != s}


@dataclass(frozen=True, slots=True)
class UsersChange:
    """What one reload of the users file changed, as far as access goes."""

    revoked_keys: frozenset[str] = frozenset()
    blocked: frozenset[str] = frozenset()
    unblocked: frozenset[str] = frozenset()
    scopes: Mapping[str, BoardScope] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.revoked_keys or self.blocked or self.unblocked or self.scopes)


def users_change(
    before: Mapping[str, str] | None,
    after: Mapping[str, str],
    blocked_before: frozenset[str],
    blocked_after: frozenset[str],
) -> UsersChange:
    """The change between two loads: key hash -> user ID maps and the blocked user IDs.

    ``before`` is None for a broker's first load: then nothing is revoked or unblocked
    (an older copy of the file must not undo another broker's revocation), but the blocks
    it holds are published (blocking more is always safe).
    """
    if before is None:
        return UsersChange(blocked=blocked_after)
    return UsersChange(
        revoked_keys=frozenset(before.keys() - after.keys()),
        blocked=blocked_after - blocked_before,
        unblocked=blocked_before - blocked_after,
    )
