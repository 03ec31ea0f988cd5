"""What the fake identity providers share: PKCE checks, JSON answers, redirects back."""

from __future__ import annotations

import base64
import hashlib
import json
from urllib.parse import urlencode

from quart import Response


def pkce_matches(verifier: str, challenge: str) -> bool:
    """Does ``verifier`` hash (S256) to the ``challenge`` the authorize request carried?"""
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == challenge


def redirect_back(uri: str, **query: str) -> Response:
    return Response("", status=302, headers={"Location": f"{uri}?{urlencode(query)}"})


def json_ok(body: object) -> Response:
    return Response(json.dumps(body), content_type="application/json")


def json_error(status: int, code: str) -> Response:
    return Response(json.dumps({"error": code}), status=status, content_type="application/json")
