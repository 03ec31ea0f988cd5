"""The transport for calls to the local LLM: aiohttp's C HTTP parser under the httpx API.

Every relayed token passes through this parser once. httpx's own transport parses HTTP/1.1
with h11, in pure Python, and that was the largest share of the connector's CPU (a
200-chunk stream: 13.2 ms of connector CPU per request with h11, 8.3 ms with this
transport, same run; docs/performance.md). ``httpx-aiohttp`` keeps the httpx API (our
``Upstream`` code, timeouts, ``httpx.MockTransport`` in tests) and hands the socket work
to aiohttp. The broker side keeps httpx's transport: it carries proxies, custom CAs and
HTTP/2, which is where httpx's own stack is the one to trust.

aiohttp's errors are converted here, once: httpx-aiohttp 0.2 maps every
``ClientConnectionError`` (a refused connection, a server that hung up mid-answer) to
``ConnectTimeout``, which would report an LLM that is down as one that is slow.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

KEEPALIVE_S = 5.0

# Most specific first: the first class the error is an instance of decides.
_ERRORS: list[tuple[type[BaseException], type[httpx.TransportError]]] = [
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.ReadError),
    (aiohttp.ClientConnectionError, httpx.ReadError),
    (TimeoutError, httpx.ReadTimeout),
]


def _convert(exc: BaseException) -> BaseException:
    """The httpx error for an aiohttp one (also when httpx-aiohttp already wrapped it)."""
    cause = exc.__cause__ if isinstance(exc, httpx.TransportError) else exc
    for source, target in _ERRORS:
        if isinstance(cause, source):
            return target(f"{type(cause).__name__}: {cause}")
    return exc


class _Body(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except (httpx.TransportError, aiohttp.ClientError, TimeoutError) as exc:
            raise _convert(exc) from exc

    async def aclose(self) -> None:
        await self._inner.aclose()


class LLMTransport(AiohttpTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await super().handle_async_request(request)
        except (httpx.TransportError, aiohttp.ClientError, TimeoutError) as exc:
            raise _convert(exc) from exc
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Body(response.stream)
        return response


def llm_transport(connections: int) -> httpx.AsyncBaseTransport:
    """Pooled connections to the local LLM, at most ``connections`` at once."""
    limits = httpx.Limits(
        max_connections=connections,
        max_keepalive_connections=connections,
        keepalive_expiry=KEEPALIVE_S,
    )
    # The local LLM is on this machine or LAN: never through a proxy (trust_env off).
    return LLMTransport(limits=limits, trust_env=False)
