"""Headers every portal response carries, and where ``next=`` may send a browser."""

from __future__ import annotations

from urllib.parse import urlsplit

from quart import Response

PORTAL_PREFIX = "/portal/"
DEFAULT_NEXT = "/portal/keys"

# No inline script or style anywhere: scripts and styles come from /portal/static only.
CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def add_security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    if response.mimetype == "text/html" or response.mimetype == "application/json":
        # Pages show one-time keys and per-user data: never kept by a cache.
        response.headers["Cache-Control"] = "no-store"
    return response


def safe_next(value: str | None) -> str:
    """``value`` if it is a path inside the portal, else the keys page.

    Refused: absolute and scheme-relative URLs (``https://evil``, ``//evil``), backslashes
    (browsers read ``/\\evil`` as ``//evil``), control characters, paths outside /portal/
    and ``..`` segments that climb out of it.
    """
    if not value or len(value) > 512:
        return DEFAULT_NEXT
    if any(ord(c) < 0x21 or c == "\\" for c in value):
        return DEFAULT_NEXT
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or value.startswith("//"):
        return DEFAULT_NEXT
    segments = parts.path.split("/")
    if not parts.path.startswith(PORTAL_PREFIX) or ".." in segments or "." in segments:
        return DEFAULT_NEXT
    if "%" in parts.path:  # an encoded slash or dot could still climb out once decoded
        return DEFAULT_NEXT
    return value
