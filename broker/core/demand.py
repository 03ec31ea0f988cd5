"""A request's worst case in tokens, estimated from its JSON body before it is queued.

The rule (docs/limits.md): the prompt is its text's UTF-8 bytes divided by 4, rounded up,
plus 4 per chat message for the role and separators (about what OpenAI's tokenizers
spend), an Anthropic ``system`` prompt counted as text; the completion is
``max_completion_tokens`` or ``max_tokens`` when the request names one, else the
configured default; embeddings have no completion. Only text is counted: an image or
audio part adds nothing to the estimate (its base64 bytes would overstate it a
hundredfold); the settle after the response corrects to the real usage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BYTES_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4


@dataclass(frozen=True, slots=True)
class Demand:
    prompt: int
    completion: int

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def _text_bytes(value: Any) -> int:
    """UTF-8 bytes of the text in a prompt, message content or embeddings input."""
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, list):
        return sum(_text_bytes(v) for v in value)
    if isinstance(value, dict):
        # A content part: {"type": "text", "text": ...}; other parts are not text.
        text = value.get("text")
        return len(text.encode("utf-8")) if isinstance(text, str) else 0
    return 0


def _prompt_tokens(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if isinstance(messages, list):
        size = _text_bytes(body.get("system"))  # Anthropic's system prompt is outside messages
        for message in messages:
            if isinstance(message, dict):
                size += _text_bytes(message.get("content"))
                size += _text_bytes(message.get("name"))
        tokens = -(-size // BYTES_PER_TOKEN)
        return tokens + TOKENS_PER_MESSAGE * len(messages)
    size = _text_bytes(body.get("prompt")) + _text_bytes(body.get("input"))
    return -(-size // BYTES_PER_TOKEN)


def _asked(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


@dataclass(frozen=True, slots=True)
class Ask:
    """What the estimate reads of a body, kept instead of the body's parsed tree."""

    prompt: int  # the prompt estimate in tokens
    max_tokens: int | None  # the completion budget the request names, if any

    def demand(self, path: str, default_max_tokens: int) -> Demand:
        if path.rstrip("/").endswith("/embeddings"):
            return Demand(self.prompt, 0)
        completion = default_max_tokens if self.max_tokens is None else self.max_tokens
        return Demand(self.prompt, completion)


def ask_of(body: dict[str, Any]) -> Ask:
    return Ask(_prompt_tokens(body), _asked(body))


def estimate(body: dict[str, Any], path: str, default_max_tokens: int) -> Demand:
    """The tokens a request may use at most: its prompt estimate and its completion budget."""
    return ask_of(body).demand(path, default_max_tokens)
