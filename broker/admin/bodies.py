"""What the admin API accepts: path IDs, query parameters and JSON bodies, checked once.

Every input is hostile: path segments must match the shape of what they name, bodies are
JSON objects within ``MAX_BODY`` bytes validated by these pydantic models (unknown fields
refused), query parameters are bounded. A failure is a ``BrokerError`` 400 (or 413) with
``invalid_request_error`` and a message naming the field, in OpenAI's envelope.
"""

from __future__ import annotations

import re
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.core.errors import BrokerError

MAX_BODY = 16 * 1024  # bytes of a JSON body

# A user: portal username or numeric ID (GitLab usernames: letters, digits, . _ -).
USER = re.compile(r"^[A-Za-z0-9_.-]{1,255}$")
# A key: its name (letters, digits, spaces or . @ : / + - _) or its prefix.
KEY = re.compile(r"^[\w .@:/+-]{1,40}$")
ENROLLMENT = re.compile(r"^e-[0-9a-f]{8}$")

M = TypeVar("M", bound=BaseModel)
Limit = int | Literal["unlimited"] | None


class LimitsBody(BaseModel):
    """New limit overrides of a user, or of one of their keys (``key``: name or prefix)."""

    model_config = ConfigDict(extra="forbid")

    limits: dict[Literal["rpm", "tpm", "concurrency", "daily_tokens", "monthly_tokens"], Limit]
    key: str | None = Field(default=None, pattern=KEY.pattern)
    replace: bool = False  # True: the overrides become exactly ``limits``


class ScopeBody(BaseModel):
    """A key's new models, expiry or label; a field left out stays as it is."""

    model_config = ConfigDict(extra="forbid")

    # Models and aliases the key may use (an empty list or ["*"]: every model).
    models: list[str] | None = Field(default=None, max_length=256)
    # A lifetime from now (90m, 12h, 30d, 2w), a UTC date (2027-01-31[T18:00]) or "never".
    expires: str | None = Field(default=None, max_length=40)
    label: str | None = Field(default=None, max_length=200)


class LlmKeyBody(BaseModel):
    """The upstream LLM key an enrolled connector sends its LLM (null: none)."""

    model_config = ConfigDict(extra="forbid")

    llm_api_key: str | None = Field(default=None, max_length=4096)


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> BrokerError:
    return BrokerError(400, message, code, param=param)


def path_id(value: str, pattern: re.Pattern[str], what: str) -> str:
    if not pattern.match(value):
        raise bad(f"{what} {value[:60]!r} is not a valid {what}", what)
    return value


def parse_body(model: type[M], data: bytes) -> M:
    try:
        return model.model_validate_json(data or b"{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise bad(f"{where}: {first['msg']}", where) from None


def query_int(text: str | None, name: str, low: int, high: int, default: int) -> int:
    if text is None or text == "":
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise bad(f"{name} must be a whole number from {low} to {high}", name)
    return int(text)


def query_text(text: str | None, name: str, limit: int = 200) -> str | None:
    if text is None or text == "":
        return None
    if len(text) > limit or not text.isprintable():
        raise bad(f"{name} must be at most {limit} printable characters", name)
    return text
