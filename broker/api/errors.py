"""OpenAI-shaped error responses for the broker's routes."""

from __future__ import annotations

import json

from quart import Response

from shared.errors import error_body, type_for_status

__all__ = ["error_response", "type_for_status"]


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = json.dumps(error_body(message, type_, param=param, code=code))
    response = Response(body, status=status, content_type="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response
