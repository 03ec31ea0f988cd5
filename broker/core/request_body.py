"""An API request's JSON body, read once: what routing needs, then only the bytes.

No I/O. A queued request waits with its body as the one ``bytes`` object the client sent
(or the broker's rewrite of it, when it asks a stream for usage); the body's text and its
parsed tree live only while ``inspect`` runs. Memory per queued request is then about its
body's size, where text and tree made it several times that (docs/security.md).

Before anything is parsed, the body's shape is bounded by counting bytes, at C speed:

- elements: every JSON value, counted as the commas plus the opening brackets plus one
  outside strings (an empty array or object counts twice). A million small numbers parse
  into tens of megabytes of Python objects, so the count, not the byte size, bounds the
  parse's memory.
- depth: the nesting of arrays and objects. Python's parser recurses per level.

Strings are cut out first with a regex that never backtracks (possessive quantifiers) and
that runs an unterminated string to the end, so no input makes it slower than linear.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import accumulate, count
from operator import sub
from typing import Any

from broker.core.demand import Ask, ask_of
from broker.core.sse_usage import with_include_usage

__all__ = ["BodyRefused", "JsonLimits", "RequestBody", "inspect", "with_model"]

_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)
_OPEN = 2  # a bracket's mark in the depth scan; a closing one is 0
_MARKS = bytes(_OPEN if chr(b) in "[{" else 0 for b in range(256))
_NOT_BRACKETS = bytes(b for b in range(256) if chr(b) not in "[]{}")


@dataclass(frozen=True, slots=True)
class JsonLimits:
    max_depth: int
    max_elements: int


class BodyRefused(Exception):
    """The body is not a JSON object the relay accepts: a 400 with ``code``."""

    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


@dataclass(frozen=True, slots=True)
class RequestBody:
    """What the relay keeps of a request body while it waits and runs."""

    raw: bytes  # what the upstream receives
    model: str
    stream: bool
    ask: Ask  # what the token estimate needs
    usage_added: bool  # the broker added stream_options.include_usage to ``raw``


def check_shape(raw: bytes, limits: JsonLimits) -> None:
    """Refuse a body with too many JSON values or too deep a nesting, before parsing it."""
    bare = _STRING.sub(b"", raw)
    opens = bare.count(b"[") + bare.count(b"{")
    elements = opens + bare.count(b",") + 1
    if elements > limits.max_elements:
        raise BodyRefused(
            f"the request body has more than {limits.max_elements} JSON values",
            "json_too_large",
        )
    if opens <= limits.max_depth:
        return  # it cannot nest deeper than it has brackets
    marks = bare.translate(_MARKS, _NOT_BRACKETS)
    # After the i-th bracket the depth is opens - closes = (sum of marks) - i.
    depth = max(map(sub, accumulate(marks), count(1)), default=0)
    if depth > limits.max_depth:
        raise BodyRefused(
            f"the request body nests JSON deeper than {limits.max_depth} levels",
            "json_too_deep",
        )


def _parse(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise BodyRefused("the request body is empty; send a JSON object", "invalid_json")
    try:
        body = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise BodyRefused("the request body nests JSON too deeply", "json_too_deep") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise BodyRefused(f"the request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise BodyRefused("the request body must be a JSON object", "invalid_json")
    return body


def inspect(
    raw: bytes, limits: JsonLimits, ask_usage: bool, stream_default: bool = False
) -> RequestBody:
    """Check and read ``raw`` once; ``ask_usage``: add include_usage to a stream request;
    ``stream_default``: whether a body without ``stream`` (or with ``null``) streams (it
    does on Ollama's /api/chat and /api/generate)."""
    check_shape(raw, limits)
    body = _parse(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BodyRefused("you must provide a model parameter", "missing_model", param="model")
    rewritten = with_include_usage(raw, body) if ask_usage else None
    return RequestBody(
        raw=raw if rewritten is None else rewritten,
        model=model,
        stream=stream_default if body.get("stream") is None else body.get("stream") is True,
        ask=ask_of(body),
        usage_added=rewritten is not None,
    )


_KEY_END = re.compile(rb"\s*:\s*")


def _model_spans(raw: bytes) -> list[tuple[int, int]]:
    """Where each top-level ``"model"`` member's value (a string token) sits in ``raw``."""
    spans: list[tuple[int, int]] = []
    depth = 0
    pos = 0
    strings = list(_STRING.finditer(raw))
    for i, match in enumerate(strings):
        between = raw[pos : match.start()]
        depth += between.count(b"{") + between.count(b"[")
        depth -= between.count(b"}") + between.count(b"]")
        pos = match.end()
        if depth != 1 or i + 1 == len(strings):
            continue
        colon = _KEY_END.match(raw, pos)
        if colon is None or json.loads(match.group()) != "model":
            continue
        value = strings[i + 1]
        if value.start() == colon.end():
            spans.append((value.start(), value.end()))
    return spans


def with_model(raw: bytes, model: str) -> bytes:
    """``raw`` (a JSON object whose ``model`` is a string) naming ``model`` instead.

    The client's bytes stay as they were but for the one value; a body that names ``model``
    more than once at the top level is re-serialized from its parsed form instead (the
    last member wins, as in the parse that routed it).
    """
    spans = _model_spans(raw)
    if len(spans) == 1:
        start, end = spans[0]
        return raw[:start] + json.dumps(model).encode() + raw[end:]
    body = json.loads(raw)
    body["model"] = model
    return json.dumps(body, ensure_ascii=False).encode()
