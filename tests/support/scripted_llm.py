"""A local LLM scripted by the test: a real aiohttp server on 127.0.0.1 with one handler.

For the connector's calls to its LLM (``connector.upstream``) where FakeLLM has no prompt
for the case: an answer that stalls, a connection dropped before the head, headers chosen
by the test. Every request it gets is kept in ``seen``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


@dataclass
class ScriptedLLM:
    url: str
    port: int
    seen: list[Seen] = field(default_factory=list)


@asynccontextmanager
async def scripted_llm(
    handler: Handler, port: int = 0, userinfo: str = ""
) -> AsyncIterator[ScriptedLLM]:
    """Serve ``handler`` for every method and path; ``url`` carries ``userinfo`` if given."""
    llm = ScriptedLLM(url="", port=port)

    async def record(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        llm.seen.append(
            Seen(
                request.method,
                request.raw_path,
                {k.lower(): v for k, v in request.headers.items()},
                body,
            )
        )
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    server = site._server
    assert server is not None and server.sockets
    llm.port = int(server.sockets[0].getsockname()[1])
    at = f"{userinfo}@" if userinfo else ""
    llm.url = f"http://{at}127.0.0.1:{llm.port}"
    try:
        yield llm
    finally:
        await runner.cleanup()
