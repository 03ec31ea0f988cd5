"""Signed portal cookies: the login session and the short-lived OAuth flow.

Both are itsdangerous timestamped signatures (HMAC-SHA1 over a salted key derived from
``--session-secret``) over small JSON payloads: nothing secret travels in them, they only
must not be forgeable or outlive their expiry. The session cookie only names a session
the broker keeps (``broker.state.portal_sessions``): logout and blocking end it there. The
cookies are HttpOnly, SameSite=Lax (the OAuth callback is a top-level GET from GitLab,
which Lax lets through), scoped to ``/portal`` and Secure when the public URL is https.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer

from broker.portal.oauth import Flow
from shared.files import write_atomic

SESSION_COOKIE = "remotellm_portal"
FLOW_COOKIE = "remotellm_login"
FLOW_MAX_AGE = 600  # seconds a user may spend on GitLab's consent page
SECRET_FILE = "session_secret"


def load_session_secret(given: str | None, data_dir: Path) -> str:
    """The configured secret, or one generated once into the data dir (mode 600)."""
    if given:
        return given
    path = data_dir / SECRET_FILE
    try:
        existing = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    secret = secrets.token_urlsafe(48)
    write_atomic(path, secret + "\n")
    return secret


@dataclass(frozen=True, slots=True)
class Session:
    gitlab_id: int
    sid: str  # random per login; the CSRF token is derived from it


@dataclass(frozen=True, slots=True)
class CookieSpec:
    name: str
    value: str
    max_age: int
    secure: bool

    def header_kwargs(self) -> dict[str, Any]:
        return {
            "key": self.name,
            "value": self.value,
            "max_age": self.max_age,
            "path": "/portal",
            "secure": self.secure,
            "httponly": True,
            "samesite": "Lax",
        }


class Cookies:
    def __init__(self, secret: str, lifetime: float, secure: bool) -> None:
        self.secret = secret
        self.lifetime = int(lifetime)
        self.secure = secure
        self._session = URLSafeTimedSerializer(secret, salt="remotellm-portal-session")
        self._flow = URLSafeTimedSerializer(secret, salt="remotellm-portal-oauth-flow")

    def new_session(self, gitlab_id: int, sid: str) -> tuple[Session, CookieSpec]:
        """The cookie naming server-side session ``sid`` (broker.state.portal_sessions)."""
        session = Session(gitlab_id=gitlab_id, sid=sid)
        value = self._session.dumps({"u": gitlab_id, "s": session.sid})
        return session, CookieSpec(SESSION_COOKIE, value, self.lifetime, self.secure)

    def session(self, value: str | None) -> Session | None:
        data = _loads(self._session, value, self.lifetime)
        if data is None:
            return None
        uid, sid = data.get("u"), data.get("s")
        if not isinstance(uid, int) or not isinstance(sid, str):
            return None
        return Session(gitlab_id=uid, sid=sid)

    def flow_cookie(self, flow: Flow) -> CookieSpec:
        value = self._flow.dumps(
            {
                "st": flow.state,
                "v": flow.verifier,
                "n": flow.next,
                "no": flow.nonce,
                "p": flow.provider,
            }
        )
        return CookieSpec(FLOW_COOKIE, value, FLOW_MAX_AGE, self.secure)

    def flow(self, value: str | None) -> Flow | None:
        data = _loads(self._flow, value, FLOW_MAX_AGE)
        if data is None:
            return None
        values = [data.get(k, "") for k in ("st", "v", "n", "no", "p")]
        if not all(isinstance(x, str) for x in values):
            return None
        state, verifier, nxt, nonce, provider = (str(x) for x in values)
        return Flow(state, verifier, nxt, nonce=nonce, provider=provider)


def _loads(
    serializer: URLSafeTimedSerializer, value: str | None, max_age: int
) -> dict[str, Any] | None:
    if not value:
        return None
    try:
        data = serializer.loads(value, max_age=max_age)
    except BadSignature:  # also SignatureExpired
        return None
    return data if isinstance(data, dict) else None
