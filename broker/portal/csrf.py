"""CSRF tokens for the portal's state-changing requests.

The token is an HMAC of the session's random id under the session secret: it is the same
for every form of one login (no server-side store), differs per login, and cannot be
computed without the secret. A cross-site page can make the browser send the cookie
(SameSite=Lax still lets top-level POSTs through in some browsers), never this token.
"""

from __future__ import annotations

import hashlib
import hmac

from broker.portal.session import Session

FORM_FIELD = "csrf_token"
HEADER = "X-CSRF-Token"


def csrf_token(secret: str, session: Session) -> str:
    mac = hmac.new(secret.encode(), b"csrf:" + session.sid.encode(), hashlib.sha256)
    return mac.hexdigest()


def csrf_ok(secret: str, session: Session, given: str | None) -> bool:
    if not given:
        return False
    return hmac.compare_digest(csrf_token(secret, session), given)
