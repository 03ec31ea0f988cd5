"""A fake OpenAI-compatible LLM server for tests: Quart on Hypercorn on 127.0.0.1.

Behaviour is chosen by the last user message (so any client can steer it):
- ``fail:<status>``            answer that status with an llama.cpp-style error body
- ``midstream-fail``           stream 3 chunks, then drop the connection
- ``utf8``                     stream multi-byte characters split across writes
- ``big:<bytes>``              a non-streamed answer of about that size
- ``slow-head:<seconds>``      wait before answering
- ``echo``                     answer with the request's headers and body length
- ``say:<text>``               stream exactly ``text`` (one chunk), e.g. markdown or HTML
- ``tokens:<n>``               like the default, with ``n`` chunks whatever ``max_tokens`` says
- ``flood:<n>:<bytes>``        stream ``n`` chunks of ``bytes`` characters each, ``chunk_delay``
                               apart (a fast producer, for backpressure tests)
Anything else: ``max_tokens`` chunks (default 5), ``chunk_delay`` seconds apart.

Every request's target (method, path as sent, query) is kept in ``targets``, any path at
all (a POST to an unknown path is answered 404 ``{"stray": true}``); ``answer_headers``
are added to every answer (a hostile upstream's Set-Cookie, Server, ...).

What a stream does with ``stream_options.include_usage`` is the server's ``usage_style``:
- ``final`` (default): one usage-only chunk (``choices: []``) before ``[DONE]``
- ``null``: that chunk, and ``"usage": null`` in every other chunk (as OpenAI documents)
- ``ignore``: nothing (as llama-cpp-python's server, measured)
Chunks carry a fixed ``created`` so two runs can be compared byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from quart import Quart, Response, request

from tests.support.loopback import LoopbackApp


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeLLM(LoopbackApp):
    models: list[str] = field(default_factory=lambda: ["fake-model"])
    chunk_delay: float = 0.0
    usage_style: Literal["final", "null", "ignore"] = "final"
    created: int = field(default_factory=lambda: int(time.time()))
    seen: list[Seen] = field(default_factory=list)
    disconnects: int = 0
    completed: int = 0
    active: int = 0
    targets: list[str] = field(default_factory=list)
    answer_headers: list[tuple[str, str]] = field(default_factory=list)

    def app(self) -> Quart:
        app = Quart("fake-llm")
        app.config["RESPONSE_TIMEOUT"] = None
        app.config["BODY_TIMEOUT"] = None
        app.config["MAX_CONTENT_LENGTH"] = None

        @app.before_request
        async def record_target() -> None:
            scope = request.scope
            raw = scope.get("raw_path") or scope["path"].encode()
            query = scope.get("query_string", b"")
            target = raw.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
            self.targets.append(f"{request.method} {target}")

        @app.after_request
        async def add_headers(response: Response) -> Response:
            for name, value in self.answer_headers:
                response.headers.add(name, value)
            return response

        @app.route("/<path:rest>", methods=["POST", "PUT", "DELETE"])
        async def stray(rest: str) -> Response:
            return Response(json.dumps({"stray": True}), 404, content_type="application/json")

        @app.get("/v1/models")
        async def models() -> Response:
            data = [{"id": m, "object": "model", "owned_by": "fake"} for m in self.models]
            return Response(
                json.dumps({"object": "list", "data": data}), content_type="application/json"
            )

        @app.post("/v1/embeddings")
        async def embeddings() -> Response:
            body = await request.get_json()
            self.seen.append(Seen(request.path, dict(request.headers), body))
            inputs = body.get("input")
            items = inputs if isinstance(inputs, list) else [inputs]
            data = [
                {"object": "embedding", "index": i, "embedding": [0.1 * (i + 1), 0.2, 0.3]}
                for i in range(len(items))
            ]
            payload = {
                "object": "list",
                "data": data,
                "model": body.get("model"),
                "usage": {"prompt_tokens": 3, "total_tokens": 3},
            }
            return Response(json.dumps(payload), content_type="application/json")

        @app.post("/v1/chat/completions")
        @app.post("/v1/completions")
        async def chat() -> Response:
            raw = await request.get_data(as_text=False)
            body = json.loads(raw)
            self.seen.append(Seen(request.path, dict(request.headers), body))
            return await self._answer(body, len(raw))

        return app

    async def _answer(self, body: dict[str, Any], raw_len: int) -> Response:
        prompt = _prompt(body)
        model = body.get("model", "fake-model")
        if prompt.startswith("slow-head:"):
            await asyncio.sleep(float(prompt.split(":", 1)[1]))
        if prompt.startswith("fail:"):
            status = int(prompt.split(":", 1)[1])
            err = {
                "error": {
                    "code": status,
                    "message": f"fake failure {status}",
                    "type": "server_error" if status >= 500 else "invalid_request_error",
                }
            }
            return Response(json.dumps(err), status=status, content_type="application/json")
        if prompt == "echo":
            content = json.dumps({"headers": dict(request.headers), "body_bytes": raw_len})
            return _json(_completion(model, content))
        if prompt.startswith("big:"):
            size = int(prompt.split(":", 1)[1])
            content = ("0123456789abcdef" * (size // 16 + 1))[:size]
            return _json(_completion(model, content))
        n = int(body.get("max_tokens") or 5)
        if prompt.startswith("tokens:"):
            n = int(prompt.split(":", 1)[1])
        if not body.get("stream"):
            await asyncio.sleep(self.chunk_delay * n)
            self.completed += 1
            return _json(_completion(model, "".join(f"tok{i} " for i in range(n))))
        asked = bool((body.get("stream_options") or {}).get("include_usage"))
        usage = asked and self.usage_style != "ignore"
        return Response(
            self._stream(model, n, prompt, usage),
            content_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    def _chunk(
        self, model: str, content: str, finish: str | None = None, usage: bool = False
    ) -> str:
        delta = {"content": content} if content else {}
        payload: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage and self.usage_style == "null":
            payload["usage"] = None
        return "data: " + json.dumps(payload, ensure_ascii=False) + "\n\n"

    def _usage_chunk(self, model: str, completion: int) -> bytes:
        counts = {"prompt_tokens": 3, "completion_tokens": completion}
        counts["total_tokens"] = 3 + completion
        payload = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": model,
            "choices": [],
            "usage": counts,
        }
        return ("data: " + json.dumps(payload) + "\n\n").encode()

    async def _stream(self, model: str, n: int, prompt: str, usage: bool = False):  # type: ignore[no-untyped-def]
        self.active += 1
        finished = False
        try:
            if prompt == "utf8":
                text = "héllo wörld 你好 🙂 ✓"
                event = self._chunk(model, text).encode()
                # Write the event a few bytes at a time so multi-byte characters are split.
                for i in range(0, len(event), 3):
                    yield event[i : i + 3]
                    await asyncio.sleep(0.001)
                yield b"data: [DONE]\n\n"
                finished = True
                return
            if prompt.startswith("say:"):
                yield self._chunk(model, prompt[4:], usage=usage).encode()
                yield self._chunk(model, "", finish="stop", usage=usage).encode()
                if usage:
                    yield self._usage_chunk(model, 1)
                yield b"data: [DONE]\n\n"
                finished = True
                return
            if prompt.startswith("flood:"):
                count, size = (int(x) for x in prompt.split(":")[1:3])
                for i in range(count):
                    if i and self.chunk_delay:
                        await asyncio.sleep(self.chunk_delay)
                    yield self._chunk(model, "f" * size).encode()
                yield b"data: [DONE]\n\n"
                finished = True
                return
            for i in range(n):
                if prompt == "midstream-fail" and i == 3:
                    raise ConnectionAbortedError("fake upstream dies mid-stream")
                if i and self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
                yield self._chunk(model, f"tok{i} ", usage=usage).encode()
            yield self._chunk(model, "", finish="stop", usage=usage).encode()
            if usage:
                yield self._usage_chunk(model, n)
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            self.active -= 1
            if finished:
                self.completed += 1
            else:
                self.disconnects += 1


def _prompt(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        content = messages[-1].get("content", "")
        return content if isinstance(content, str) else ""
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else ""


def _json(payload: dict[str, Any]) -> Response:
    return Response(json.dumps(payload), content_type="application/json")


def _completion(model: str, content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    }
