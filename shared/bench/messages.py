"""The fake upstream's Anthropic Messages API (``POST /v1/messages`` and ``count_tokens``).

``shared.bench.upstream.FakeLLM`` routes those paths here. The last user message chooses
the answer as for chat completions (``fail:<status>``, ``midstream-fail``,
``tokens:<n>``, default ``max_tokens`` words ``tok0 tok1 ...``); a request with ``tools``
is answered with a text block and a ``tool_use`` block calling the first tool. The wire
format follows Anthropic's "Messages" and "Streaming Messages" reference: ``message_start``
(usage.input_tokens), ``content_block_start`` / ``_delta`` / ``_stop``, ``message_delta``
(the cumulative usage.output_tokens) and ``message_stop``, each an SSE event with its
``event:`` name; errors are ``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

INPUT_TOKENS = 11  # what every answer reports as its input
TOOL_INPUT = {"city": "Paris", "unit": "celsius"}
TOOL_TEXT = "Let me check."
DEFAULT_WORDS = 5


def prompt_of(body: dict[str, Any]) -> str:
    """The last message's text (a string, or its first text block)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return ""
    content = messages[-1].get("content", "")
    if isinstance(content, list):
        texts = [b.get("text") for b in content if isinstance(b, dict) and b.get("type") == "text"]
        content = texts[0] if texts else ""
    return content if isinstance(content, str) else ""


def words(body: dict[str, Any], prompt: str) -> int:
    if prompt.startswith("tokens:"):
        return int(prompt.split(":", 1)[1])
    return int(body.get("max_tokens") or DEFAULT_WORDS)


def error(status: int) -> dict[str, Any]:
    kind = "api_error" if status >= 500 else "invalid_request_error"
    return {"type": "error", "error": {"type": kind, "message": f"fake failure {status}"}}


def tool_name(body: dict[str, Any]) -> str | None:
    tools = body.get("tools")
    if isinstance(tools, list) and tools and isinstance(tools[0], dict):
        name = tools[0].get("name")
        return name if isinstance(name, str) else None
    return None


def message(body: dict[str, Any], prompt: str) -> dict[str, Any]:
    """A whole (non-streamed) answer."""
    model = str(body.get("model", "fake-model"))
    tool = tool_name(body)
    n = words(body, prompt)
    content: list[dict[str, Any]]
    if tool is not None:
        content = [
            {"type": "text", "text": TOOL_TEXT},
            {"type": "tool_use", "id": "toolu_fake", "name": tool, "input": TOOL_INPUT},
        ]
    else:
        content = [{"type": "text", "text": "".join(f"tok{i} " for i in range(n))}]
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": "tool_use" if tool else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": n},
    }


def sse(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode()


def _start(model: str) -> bytes:
    start = message({"model": model, "max_tokens": 0}, "")
    start.update(content=[], stop_reason=None)
    start["usage"] = {"input_tokens": INPUT_TOKENS, "output_tokens": 1}
    return sse("message_start", {"type": "message_start", "message": start})


def _block(index: int, block: dict[str, Any], deltas: list[dict[str, Any]]) -> list[bytes]:
    out = [sse("content_block_start", {"type": "content_block_start", "index": index,
                                       "content_block": block})]  # fmt: skip
    for delta in deltas:
        event = {"type": "content_block_delta", "index": index, "delta": delta}
        out.append(sse("content_block_delta", event))
    out.append(sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    return out


async def stream(body: dict[str, Any], prompt: str, delay: float) -> AsyncGenerator[bytes, None]:
    """A streamed answer, ``delay`` seconds between deltas."""
    model = str(body.get("model", "fake-model"))
    tool = tool_name(body)
    n = words(body, prompt)
    yield _start(model)
    yield sse("ping", {"type": "ping"})
    if tool is not None:
        said = [{"type": "text_delta", "text": TOOL_TEXT}]
        events = _block(0, {"type": "text", "text": ""}, said)
        arguments = json.dumps(TOOL_INPUT)
        pieces = [arguments[:10], arguments[10:]]
        events += _block(
            1,
            {"type": "tool_use", "id": "toolu_fake", "name": tool, "input": {}},
            [{"type": "input_json_delta", "partial_json": p} for p in pieces],
        )
        n = 7
    else:
        texts = [{"type": "text_delta", "text": f"tok{i} "} for i in range(n)]
        events = _block(0, {"type": "text", "text": ""}, texts)
    for i, event in enumerate(events):
        if prompt == "midstream-fail" and i == 4:  # the start, and three deltas
            raise ConnectionAbortedError("fake upstream dies mid-stream")
        if i and delay and b"content_block_delta" in event:
            await asyncio.sleep(delay)
        yield event
    stop = "tool_use" if tool else "end_turn"
    delta = {"stop_reason": stop, "stop_sequence": None}
    yield sse("message_delta", {"type": "message_delta", "delta": delta,
                                "usage": {"output_tokens": n}})  # fmt: skip
    yield sse("message_stop", {"type": "message_stop"})
