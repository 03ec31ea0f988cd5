"""A short fingerprint of a connector's enrollment secret, shown on both sides.

The connector prints it while it waits; the approval page shows it next to each pending
entry, so the operator approves the connector they are looking at, not a stranger that
asked with the same name. It is the first 16 hex digits of the secret's SHA-256 (the hash
the broker keeps), in groups of four: it tells entries apart and reveals nothing usable.
"""

from __future__ import annotations

import hashlib

DIGITS = 16


def fingerprint_of_digest(sha256_hex: str) -> str:
    """The fingerprint from the secret's SHA-256 in hex (what the broker stores)."""
    head = sha256_hex[:DIGITS].lower()
    return "-".join(head[i : i + 4] for i in range(0, len(head), 4))


def fingerprint(secret: str) -> str:
    """The fingerprint of an enrollment secret."""
    return fingerprint_of_digest(hashlib.sha256(secret.encode()).hexdigest())
