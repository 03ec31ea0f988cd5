from __future__ import annotations

import json
from typing import Any

import pytest

from shared.errors import ConfigError, FrameError, RemoteLLMError, error_body, normalize_error_body


def _env(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


OPENAI_BODY = _env("Invalid 'messages'", "invalid_request_error", "messages", "invalid_value")


@pytest.mark.parametrize(
    ("raw", "status", "expected"),
    [
        pytest.param(
            # llama.cpp: integer code, its own type names
            b'{"error":{"code":400,"message":"the request exceeds the context size",'
            b'"type":"exceed_context_size_error","n_prompt_tokens":9000}}',
            400,
            _env("the request exceeds the context size", "exceed_context_size_error", None, "400"),
            id="llama.cpp",
        ),
        pytest.param(
            b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}',
            503,
            _env("Loading model", "unavailable_error", None, "503"),
            id="llama.cpp-loading",
        ),
        pytest.param(
            # vLLM: a flat object with "object": "error" and an integer code
            b'{"object":"error","message":"The model `x` does not exist.",'
            b'"type":"NotFoundError","param":null,"code":404}',
            404,
            _env("The model `x` does not exist.", "NotFoundError", None, "404"),
            id="vllm",
        ),
        pytest.param(
            b'{"object":"error","message":"bad temperature","type":"BadRequestError",'
            b'"param":"temperature","code":400}',
            400,
            _env("bad temperature", "BadRequestError", "temperature", "400"),
            id="vllm-param",
        ),
        pytest.param(
            b'{"error":"model \\"llama9\\" not found, try pulling it first"}',
            404,
            _env('model "llama9" not found, try pulling it first', "not_found_error"),
            id="ollama",
        ),
        pytest.param(
            b'{"error":"unexpected server failure"}',
            500,
            _env("unexpected server failure", "server_error"),
            id="ollama-500",
        ),
        pytest.param(
            b"Internal Server Error",
            500,
            _env("Internal Server Error", "server_error"),
            id="plain-text",
        ),
        pytest.param(
            b"  <html>Bad Gateway</html>\n",
            502,
            _env("<html>Bad Gateway</html>", "server_error"),
            id="plain-text-stripped",
        ),
        pytest.param(b"", 503, _env("upstream returned HTTP 503", "server_error"), id="empty"),
        pytest.param(
            b"   \n", 429, _env("upstream returned HTTP 429", "rate_limit_error"), id="ws"
        ),
        pytest.param(
            json.dumps(OPENAI_BODY).encode(), 400, OPENAI_BODY, id="already-openai-unchanged"
        ),
        pytest.param(
            b'{"detail":"Not authenticated"}',
            401,
            _env("Not authenticated", "authentication_error"),
            id="fastapi-detail",
        ),
        pytest.param(
            b'{"error":{"message":"m","code":null,"param":7}}',
            400,
            _env("m", "invalid_request_error", "7", None),
            id="int-param-stringified",
        ),
        pytest.param(b"[1, 2]", 400, _env("[1, 2]", "invalid_request_error"), id="json-list"),
        pytest.param(
            b"\xff\xfe broken",
            500,
            _env("\ufffd\ufffd broken", "server_error"),
            id="invalid-utf8",
        ),
    ],
)
def test_normalize_error_body(raw: bytes, status: int, expected: dict[str, Any]) -> None:
    body = normalize_error_body(raw, status)
    assert body == expected
    # What every OpenAI SDK relies on: a string (or null) code and a string message.
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["code"] is None or isinstance(body["error"]["code"], str)


@pytest.mark.parametrize(
    ("status", "type_"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "invalid_request_error"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "server_error"),
        (502, "server_error"),
        (503, "server_error"),
        (504, "server_error"),
    ],
)
def test_type_defaults_by_status(status: int, type_: str) -> None:
    assert normalize_error_body(b'{"error": "boom"}', status)["error"]["type"] == type_
    assert normalize_error_body(b"", status)["error"]["type"] == type_


def test_upstream_type_wins_over_status_default() -> None:
    body = normalize_error_body(b'{"error":{"message":"x","type":"custom"}}', 500)
    assert body["error"]["type"] == "custom"


def test_long_plain_text_is_truncated() -> None:
    body = normalize_error_body(b"e" * 10_000, 500)
    assert body["error"]["message"] == "e" * 2000


def test_error_body_shape() -> None:
    assert error_body("nope", "server_error", code="x") == {
        "error": {"message": "nope", "type": "server_error", "param": None, "code": "x"}
    }


def test_exception_tree() -> None:
    assert issubclass(FrameError, RemoteLLMError)
    assert issubclass(ConfigError, RemoteLLMError)
    assert not issubclass(FrameError, ConfigError)
