"""Errors and the OpenAI error envelope.

Exception tree::

    RemoteLLMError
    ├── FrameError          a connector upload is not well-formed
    └── ConfigError         a setting or config file is invalid
"""

from __future__ import annotations

import json
from typing import Any


class RemoteLLMError(Exception):
    """Base of every error this project raises on purpose."""


class FrameError(RemoteLLMError):
    """A connector upload is not well-formed."""


class ConfigError(RemoteLLMError):
    """A setting or config file is invalid."""


def error_body(
    message: str,
    type_: str = "invalid_request_error",
    *,
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def quote(text: str, limit: int = 200) -> str:
    """Client input echoed in an error message, cut to ``limit`` characters."""
    return text if len(text) <= limit else text[:limit] + "…"


def type_for_status(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def normalize_error_body(raw: bytes, status: int) -> dict[str, Any]:
    """Turn any upstream error body into OpenAI's envelope, keeping its message.

    llama.cpp and vLLM send integer codes, Ollama sometimes ``{"error": "text"}``, and
    some servers plain text; the SDKs expect ``code`` to be a string or null.
    """
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        parsed: Any = json.loads(text) if text else None
    except ValueError:
        parsed = None
    message: str | None = None
    type_: str | None = None
    param: Any = None
    code: Any = None
    if isinstance(parsed, dict):
        err = parsed.get("error", parsed)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or err.get("msg")
            message = msg if isinstance(msg, str) else (json.dumps(msg) if msg else None)
            t = err.get("type")
            type_ = t if isinstance(t, str) else None
            param = err.get("param")
            code = err.get("code")
        elif isinstance(err, str):
            message = err
    if message is None:
        message = text[:2000] if text else f"upstream returned HTTP {status}"
    if code is not None and not isinstance(code, str):
        code = str(code)
    if param is not None and not isinstance(param, str):
        param = str(param)
    return error_body(message, type_ or type_for_status(status), param=param, code=code)
