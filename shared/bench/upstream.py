"""A fake OpenAI-compatible upstream: raw asyncio HTTP/1.1 on 127.0.0.1, one process.

The benchmark runs it as a process (``python -m shared.bench.upstream --port P``); the
tests start it in their own event loop (``await fake.start()``) or, when they are
synchronous, in a thread of its own (``fake.start_in_thread()``).

A body with ``bench_chunk_bytes`` or ``bench_delay_ms`` is the benchmark's workload:
``max_tokens`` (default 10) chunks of ``bench_chunk_bytes`` bytes, ``bench_delay_ms``
apart (0: written back to back). Otherwise the last user message chooses the answer:
- ``fail:<status>``            that status with an llama.cpp-style error body
- ``midstream-fail``           stream 3 chunks, then drop the connection
- ``utf8``                     stream multi-byte characters split across writes
- ``big:<bytes>``              a non-streamed answer of about that size
- ``slow-head:<seconds>``      wait before answering
- ``hold``                     set ``held``, answer only once ``release`` is set
- ``echo``                     answer with the request's headers and body length
- ``say:<text>``               stream exactly ``text`` (one chunk), e.g. markdown or HTML
- ``tokens:<n>``               like the default, with ``n`` chunks whatever ``max_tokens`` says
- ``flood:<n>:<bytes>``        stream ``n`` chunks of ``bytes`` characters each, ``chunk_delay``
                               apart (a fast producer, for backpressure tests)
Anything else: ``max_tokens`` chunks (default 5) ``tok0 tok1 ...``, ``chunk_delay`` apart.
``/v1/messages`` and ``/v1/messages/count_tokens`` speak Anthropic's Messages API
(``shared.bench.messages``), with the same prompts where they apply.

Every request's target (method and target as sent) is kept in ``targets`` and each body
in ``seen`` (unless ``record`` is off, as in the benchmark); a POST, PUT or DELETE to an
unknown path is answered 404 ``{"stray": true}``. ``answer_headers`` are added to every
answer (a hostile upstream's Set-Cookie, Server, ...).

What a stream does with ``stream_options.include_usage`` is the server's ``usage_style``:
- ``final`` (default): one usage-only chunk (``choices: []``) before ``[DONE]``
- ``null``: that chunk, and ``"usage": null`` in every other chunk (as OpenAI documents)
- ``ignore``: nothing (as llama-cpp-python's server, measured)
Chunks carry a fixed ``created`` so two runs can be compared byte for byte.

``ollama=True`` also serves Ollama's native API under ``/api/`` (``shared.bench.ollama_fake``);
without it those paths are 404, as on an engine that is not Ollama.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal
from urllib.parse import unquote

from shared.bench import messages, ollama_fake

DONE = b"data: [DONE]\n\n"
MESSAGES_ROUTES = ("/v1/messages", "/v1/messages/count_tokens")
DEFAULT_TOKENS = 5
HEAD_LIMIT = 1 << 20


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]  # names title-cased; the last of repeated names
    raw: bytes

    @property
    def path(self) -> str:
        return unquote(self.target.split("?", 1)[0])


@dataclass
class Answer:
    """A whole answer (``body``) or a streamed one (``stream`` of SSE event bytes)."""

    status: int = 200
    body: bytes = b""
    stream: AsyncGenerator[bytes, None] | None = None
    content_type: str = "application/json"


class Disconnected(Exception):
    """The client went away while its stream was being written."""


@dataclass
class FakeLLM:
    models: list[str] = field(default_factory=lambda: ["fake-model"])
    chunk_delay: float = 0.0
    usage_style: Literal["final", "null", "ignore"] = "final"
    created: int = field(default_factory=lambda: int(time.time()))
    record: bool = True
    # Print a hop_trace line (JSON) per relayed request: when it was read, when the answer's
    # head was written (remotellm-bench local --trace; shared/bench/hops.py).
    trace: bool = False
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    answer_headers: list[tuple[str, str]] = field(default_factory=list)
    ollama: bool = False  # also speak Ollama's native API (/api/*)
    ollama_version: str = "0.6.2"
    disconnects: int = 0
    completed: int = 0
    active: int = 0
    held: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _head_written: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def model(self) -> str:
        return self.models[0]

    @property
    def words(self) -> tuple[str, ...]:
        """The chunks of the default answer (no ``max_tokens``)."""
        return tuple(f"tok{i} " for i in range(DEFAULT_TOKENS))

    @property
    def answer(self) -> str:
        return "".join(self.words)

    # --- serving ------------------------------------------------------------------------

    async def start(self, port: int | None = None) -> None:
        self._server = await asyncio.start_server(
            self._connection, "127.0.0.1", port or self.port, backlog=4096, limit=HEAD_LIMIT
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    def start_in_thread(self) -> None:
        """Serve from an event loop in a daemon thread (for synchronous tests)."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.start(), loop).result(10)

    def stop_in_thread(self) -> None:
        assert self._loop is not None and self._thread is not None
        asyncio.run_coroutine_threadsafe(self.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while (request := await _read_request(reader)) is not None:
                received = time.time_ns()
                self._note(request)
                answer = await self._route(request)
                await self._write(answer, reader, writer)
                if self.trace:
                    _trace_line(request, received, self._head_written)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        except (ConnectionError, Disconnected):
            pass
        except asyncio.CancelledError:
            pass  # only ``stop`` cancels: the connection just ends
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _note(self, request: Request) -> None:
        if self.record:
            self.targets.append(f"{request.method} {request.target}")

    async def _route(self, request: Request) -> Answer:
        path = request.path
        if request.method == "GET" and path.rstrip("/") == "/v1/models":
            data = [{"id": m, "object": "model", "owned_by": "fake"} for m in self.models]
            return _json({"object": "list", "data": data})
        if self.ollama and path.startswith("/api/"):
            return await self._ollama(request)
        routes = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", *MESSAGES_ROUTES)
        if request.method != "POST" or path not in routes:
            stray = request.method in ("POST", "PUT", "DELETE")
            return _json({"stray": True} if stray else {"error": "not found"}, 404)
        body = json.loads(request.raw or b"{}")
        if "bench_chunk_bytes" in body or "bench_delay_ms" in body:
            return Answer(stream=_bench_stream(body), content_type="text/event-stream")
        if self.record:
            self.seen.append(Seen(path, request.headers, body))
        if path == "/v1/embeddings":
            return _embeddings(body)
        if path in MESSAGES_ROUTES:
            return self._messages(path, body)
        return await self._answer(body, request)

    async def _write(
        self, answer: Answer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        reason = HTTPStatus(answer.status).phrase
        head = [f"HTTP/1.1 {answer.status} {reason}", f"Content-Type: {answer.content_type}"]
        if answer.stream is None:
            head.append(f"Content-Length: {len(answer.body)}")
        else:
            head += ["Cache-Control: no-cache", "Transfer-Encoding: chunked"]
        head += [f"{name}: {value}" for name, value in self.answer_headers]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + answer.body)
        self._head_written = time.time_ns()
        if answer.stream is not None:
            try:
                async for event in answer.stream:
                    if reader.at_eof() or writer.transport.is_closing():
                        raise Disconnected
                    writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                    await writer.drain()
            finally:
                await answer.stream.aclose()  # its counters settle now, not at collection
            writer.write(b"0\r\n\r\n")
        await writer.drain()

    # --- answers ------------------------------------------------------------------------

    async def _answer(self, body: dict[str, Any], request: Request) -> Answer:
        prompt = _prompt(body)
        model = str(body.get("model", "fake-model"))
        if prompt.startswith("slow-head:"):
            await asyncio.sleep(float(prompt.split(":", 1)[1]))
        if prompt == "hold":
            self.held.set()
            await self.release.wait()
            return _json(_completion(model, "released"))
        if prompt.startswith("fail:"):
            return _failure(int(prompt.split(":", 1)[1]))
        if prompt == "echo":
            content = json.dumps({"headers": request.headers, "body_bytes": len(request.raw)})
            return _json(_completion(model, content))
        if prompt.startswith("big:"):
            size = int(prompt.split(":", 1)[1])
            return _json(_completion(model, ("0123456789abcdef" * (size // 16 + 1))[:size]))
        n = int(body.get("max_tokens") or DEFAULT_TOKENS)
        if prompt.startswith("tokens:"):
            n = int(prompt.split(":", 1)[1])
        if not body.get("stream"):
            await asyncio.sleep(self.chunk_delay * n)
            self.completed += 1
            return _json(_completion(model, "".join(f"tok{i} " for i in range(n))))
        asked = bool((body.get("stream_options") or {}).get("include_usage"))
        usage = asked and self.usage_style != "ignore"
        events = self._counted(self._events(model, n, prompt, usage))
        return Answer(stream=events, content_type="text/event-stream")

    def _messages(self, path: str, body: dict[str, Any]) -> Answer:
        """Anthropic's Messages API (``shared.bench.messages``)."""
        if path.endswith("/count_tokens"):
            return _json({"input_tokens": messages.INPUT_TOKENS})
        prompt = messages.prompt_of(body)
        if prompt.startswith("fail:"):
            status = int(prompt.split(":", 1)[1])
            return _json(messages.error(status), status)
        if not body.get("stream"):
            self.completed += 1
            return _json(messages.message(body, prompt))
        events = self._counted(messages.stream(body, prompt, self.chunk_delay))
        return Answer(stream=events, content_type="text/event-stream")

    async def _ollama(self, request: Request) -> Answer:
        """Ollama's native API (``shared.bench.ollama_fake``)."""
        path, fake = request.path, ollama_fake
        if request.method == "GET" and path == "/api/version":
            return _json({"version": self.ollama_version})
        if request.method == "GET" and path == "/api/tags":
            return _json(fake.tags(self.models))
        routes = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show")
        if request.method != "POST" or path not in routes:
            return Answer(404, fake.error(f"{request.method} {path}: not found"))
        body = json.loads(request.raw or b"{}")
        if self.record:
            self.seen.append(Seen(path, request.headers, body))
        model = str(body.get("model", ""))
        if model not in self.models:
            return Answer(404, fake.not_found(model))
        if path == "/api/show":
            return _json(fake.show(model))
        if path == "/api/embed":
            return _json(fake.embed(body))
        if path == "/api/embeddings":
            return _json({"embedding": [0.1, 0.2, 0.3]})
        return await self._ollama_generate(path == "/api/chat", model, body)

    async def _ollama_generate(self, chat: bool, model: str, body: dict[str, Any]) -> Answer:
        prompt = _prompt(body)
        if prompt.startswith("fail:"):
            status = int(prompt.split(":", 1)[1])
            return Answer(status, ollama_fake.error(f"fake failure {status}"))
        if prompt == "hold":
            self.held.set()
            await self.release.wait()
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        n = int((options or {}).get("num_predict") or DEFAULT_TOKENS)
        if prompt.startswith("tokens:"):
            n = int(prompt.split(":", 1)[1])
        if body.get("stream") is False:
            self.completed += 1
            text = "".join(f"tok{i} " for i in range(n))
            return _json(ollama_fake.final(chat, model, text, n))

        async def pause(_: int) -> None:
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)

        lines = ollama_fake.stream(chat, model, n, pause)
        return Answer(stream=self._counted(lines), content_type=ollama_fake.NDJSON)

    async def _counted(self, events: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        self.active += 1
        finished = False
        try:
            async for event in events:
                yield event
            finished = True
        finally:
            self.active -= 1
            if finished:
                self.completed += 1
            else:
                self.disconnects += 1

    async def _events(
        self, model: str, n: int, prompt: str, usage: bool
    ) -> AsyncGenerator[bytes, None]:
        if prompt == "utf8":
            event = self._chunk(model, "héllo wörld 你好 🙂 ✓")
            for i in range(0, len(event), 3):  # multi-byte characters split across writes
                yield event[i : i + 3]
                await asyncio.sleep(0.001)
        elif prompt.startswith("say:"):
            yield self._chunk(model, prompt[4:], usage=usage)
            yield self._chunk(model, "", finish="stop", usage=usage)
            if usage:
                yield self._usage_chunk(model, 1)
        elif prompt.startswith("flood:"):
            count, size = (int(x) for x in prompt.split(":")[1:3])
            for i in range(count):
                if i and self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
                yield self._chunk(model, "f" * size)
        else:
            for i in range(n):
                if prompt == "midstream-fail" and i == 3:
                    raise ConnectionAbortedError("fake upstream dies mid-stream")
                if i and self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
                yield self._chunk(model, f"tok{i} ", usage=usage)
            yield self._chunk(model, "", finish="stop", usage=usage)
            if usage:
                yield self._usage_chunk(model, n)
        yield DONE

    def _chunk(
        self, model: str, content: str, finish: str | None = None, usage: bool = False
    ) -> bytes:
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
        return ("data: " + json.dumps(payload, ensure_ascii=False) + "\n\n").encode()

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


# --- HTTP/1.1 ---------------------------------------------------------------------------


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    """The next request on the connection; None once the client closes it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().title()] = value.strip()
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        raw = await _read_chunked(reader)
    else:
        length = int(headers.get("Content-Length") or 0)
        raw = await reader.readexactly(length) if length else b""
    return Request(method, target, headers, raw)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16):
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
        pass
    return b"".join(parts)


# --- bodies -----------------------------------------------------------------------------


async def _bench_stream(body: dict[str, Any]) -> AsyncGenerator[bytes, None]:
    n = int(body.get("max_tokens", 10))
    size = int(body.get("bench_chunk_bytes", 64))
    delay = float(body.get("bench_delay_ms", 0)) / 1000.0
    for i in range(n):
        yield _bench_event(i, size)
        if delay:
            await asyncio.sleep(delay)
    yield DONE


def _bench_event(index: int, size: int) -> bytes:
    # A chat.completion.chunk-like event padded to ``size`` bytes of content.
    head = (
        b'data: {"id":"b","object":"chat.completion.chunk",'
        b'"choices":[{"index":0,"delta":{"content":"'
    )
    tail = b'"}}]}\n\n'
    pad = max(1, size - len(head) - len(tail))
    return head + (b"%d" % index).ljust(pad, b"x")[:pad] + tail


def _prompt(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        content = messages[-1].get("content", "")
        return content if isinstance(content, str) else ""
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else ""


def _json(payload: object, status: int = 200) -> Answer:
    return Answer(status, json.dumps(payload).encode())


def _failure(status: int) -> Answer:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    error = {"code": status, "message": f"fake failure {status}", "type": kind}
    return _json({"error": error}, status)


def _embeddings(body: dict[str, Any]) -> Answer:
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    data = [
        {"object": "embedding", "index": i, "embedding": [0.1 * (i + 1), 0.2, 0.3]}
        for i in range(len(items))
    ]
    usage = {"prompt_tokens": 3, "total_tokens": 3}
    return _json({"object": "list", "data": data, "model": body.get("model"), "usage": usage})


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


def _trace_line(request: Request, received: int, head_written: int) -> None:
    rid = request.headers.get("X-Remotellm-Request-Id")
    if rid:
        marks = {"llm_received": received, "llm_head": head_written}
        line = {"event": "hop_trace", "request_id": rid, "side": "llm", "marks": marks}
        print(json.dumps(line), flush=True)


async def serve(port: int, models: list[str], trace: bool = False) -> None:
    fake = FakeLLM(models=models, record=False, trace=trace)
    await fake.start(port)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake OpenAI-compatible upstream.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", action="append", help="listed by /v1/models (bench)")
    parser.add_argument("--trace", action="store_true", help="print hop_trace lines")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.model or ["bench"], args.trace))


if __name__ == "__main__":
    main()
