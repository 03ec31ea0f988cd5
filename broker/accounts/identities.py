"""Which numeric user ID a login gets: GitLab's own, or one derived for an OIDC identity.

The users file, the sessions and ``--admin-id`` name a user by one integer. A GitLab user
keeps GitLab's numeric id (positive). An OpenID Connect user is (provider name, ``sub``):
its ID is the first 63 bits of SHA-256 over both, negated, so it never equals a GitLab id
and two providers' ``sub`` values never meet (a provider name is part of the hash). The
users file also records provider and subject, so a hash collision is caught at login
(``UsersStore.login`` refuses it) instead of handing one user's keys to another.
"""

from __future__ import annotations

import hashlib
import re

PROVIDER_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
RESERVED_NAMES = frozenset({"gitlab"})  # user IDs "gitlab-<id>" belong to GitLab users


def oidc_user_id(provider: str, subject: str) -> int:
    """The stable numeric ID of ``subject`` at ``provider`` (always below zero)."""
    digest = hashlib.sha256(f"{provider}\0{subject}".encode()).digest()
    return -(int.from_bytes(digest[:8], "big") >> 1) - 1


def is_oidc_user_id(user_id: int) -> bool:
    return user_id < 0


class IdentityClash(ValueError):
    """Two identities hash to one user ID: the login is refused, never merged."""
