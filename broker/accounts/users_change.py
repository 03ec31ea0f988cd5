"""What one reload of the users file changed, as far as access goes (revoked keys, blocked
and unblocked users): the users store computes it, the revocation board publishes it.

Apart from ``broker.accounts.revocations`` so that a broker without Redis never loads
redis-py (the users store needs this, the board needs Redis).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class UsersChange:
    """What one reload of the users file changed, as far as access goes."""

    revoked_keys: frozenset[str] = frozenset()
    blocked: frozenset[str] = frozenset()
    unblocked: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        return not (self.revoked_keys or self.blocked or self.unblocked)


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
