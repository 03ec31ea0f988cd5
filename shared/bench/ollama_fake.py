"""The Ollama side of ``FakeLLM`` (``FakeLLM(ollama=True)``): Ollama's native API.

The wire format follows Ollama's docs/api.md (docs/clients.md, "Ollama's native API"):
``GET /api/version`` ``{"version"}``, ``GET /api/tags`` ``{"models": [...]}`` (what the
connector detects Ollama by), ``POST /api/chat`` and ``/api/generate`` streaming NDJSON
unless ``"stream": false`` (``message.content`` or ``response`` per line, then a last
line with ``"done": true``, ``done_reason``, ``prompt_eval_count`` and ``eval_count``),
``/api/embed`` (``embeddings`` and ``prompt_eval_count``), ``/api/embeddings`` (legacy:
``embedding``), ``/api/show`` (``details``, ``model_info``, ``capabilities``). A model
the fake does not serve is 404 ``{"error": "model \\"x\\" not found, try pulling it
first"}``. The prompt words of ``FakeLLM`` apply: ``tokens:<n>``, ``hold``, ``fail:<status>``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from typing import Any

PROMPT_EVAL_COUNT = 7  # what every answer reports as the prompt's tokens
NDJSON = "application/x-ndjson"


def created_at() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def line(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode() + b"\n"


def error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def not_found(model: str) -> bytes:
    return error(f'model "{model}" not found, try pulling it first')


def tags(models: list[str]) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": m,
                "model": m,
                "modified_at": created_at(),
                "size": 1_000_000,
                "digest": "0" * 64,
                "details": details(),
            }
            for m in models
        ]
    }


def details() -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": "fake",
        "families": ["fake"],
        "parameter_size": "1M",
        "quantization_level": "Q8_0",
    }


def show(model: str) -> dict[str, Any]:
    return {
        "modelfile": f"FROM {model}\n",
        "parameters": "temperature 0.7",
        "template": "{{ .Prompt }}",
        "details": details(),
        "model_info": {"general.architecture": "fake", "fake.context_length": 4096},
        "capabilities": ["completion"],
        "modified_at": created_at(),
    }


def embed(body: dict[str, Any]) -> dict[str, Any]:
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    vectors = [[0.1 * (i + 1), 0.2, 0.3] for i in range(len(items))]
    return {
        "model": body.get("model"),
        "embeddings": vectors,
        "total_duration": 1000,
        "load_duration": 100,
        "prompt_eval_count": PROMPT_EVAL_COUNT,
    }


def _piece(chat: bool, model: str, text: str, done: bool) -> dict[str, Any]:
    piece: dict[str, Any] = {"model": model, "created_at": created_at()}
    if chat:
        piece["message"] = {"role": "assistant", "content": text}
    else:
        piece["response"] = text
    piece["done"] = done
    return piece


def final(chat: bool, model: str, text: str, n: int) -> dict[str, Any]:
    """The last object of an answer (the whole answer when not streamed)."""
    piece = _piece(chat, model, text, True)
    piece.update(
        done_reason="stop",
        total_duration=5_000_000,
        load_duration=1_000_000,
        prompt_eval_count=PROMPT_EVAL_COUNT,
        prompt_eval_duration=1_000_000,
        eval_count=n,
        eval_duration=3_000_000,
    )
    if not chat:
        piece["context"] = [1, 2, 3]
    return piece


async def stream(chat: bool, model: str, n: int, pause: Any) -> AsyncGenerator[bytes, None]:
    """``n`` lines of one token each, ``await pause(i)`` before each but the first, then
    the final line."""
    for i in range(n):
        if i:
            await pause(i)
        yield line(_piece(chat, model, f"tok{i} ", False))
    yield line(final(chat, model, "", n))
