"""Calls to the local LLM (any OpenAI-compatible server) and the per-request pump.

One HTTP stack to the LLM: an ``aiohttp.ClientSession`` (its C HTTP parser; every relayed
token passes through it once), pooled, made on first use inside the event loop. aiohttp's
errors are converted here, once, into ``UpstreamError`` (``get_json``) or the END frame
that says what happened (``pump``). The broker side keeps httpx (``broker_client``): it
carries proxies, custom CAs and HTTP/2, which the call to a local LLM never needs.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import time
import uuid
from collections.abc import Callable
from urllib.parse import unquote

import aiohttp
from yarl import URL

from connector.pipe import FrameSink
from connector.settings import ConnectorSettings
from shared.hoptrace import HopTrace
from shared.logging import get_logger
from shared.paths import PathRefused, relay_target
from shared.protocol import (
    REQUEST_ID_HEADER,
    UPSTREAM_REQUEST_ID_HEADER,
    RequestItem,
    ResponseEnd,
    ResponseHead,
)

KEEPALIVE_S = 5.0
# A request body may take this long to go out (aiohttp has no per-write timeout: the head
# phase is bounded by connect + write + read instead; the read timeout starts once it is sent).
WRITE_TIMEOUT_S = 60.0
# The reader's buffer: past twice this, aiohttp stops reading the socket until the pump
# has taken what is there (a chunk is passed on as soon as it is read).
READ_BUFSIZE = 1 << 16


class UpstreamError(Exception):
    """A call to the local LLM failed; ``answered``: it did answer (an HTTP error, bad JSON)."""

    def __init__(self, message: str, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered


log = get_logger("connector.upstream")


_DROP_RESPONSE_HEADERS = frozenset({b"connection", b"keep-alive", b"transfer-encoding"})
# aiohttp would add Content-Type: application/octet-stream to a bytes body the user sent
# without one, and its own User-Agent: the LLM sees the user's headers, nothing invented.
_SKIP_AUTO_HEADERS = frozenset({"Content-Type", "User-Agent"})


class Upstream:
    def __init__(self, settings: ConnectorSettings, connections: int | None = None) -> None:
        # Credentials in the URL become a default Basic header: the URL itself (logged,
        # shown by /health) never carries them, and aiohttp refuses a URL with both.
        base = URL(settings.llm_url)
        self._headers: dict[str, str] = {}
        user, password = base.raw_user, base.raw_password
        if user is not None or password is not None:
            userinfo = (user or "") + ("" if password is None else f":{password}")
            self._headers["authorization"] = _basic(userinfo)
            base = base.with_user(None)
        self.url = str(base).rstrip("/")
        self.api_key = settings.llm_api_key
        # What the LLM is ("ollama/0.6.2", "" for OpenAI-only), set by connector/engine.py
        # at each registration: Ollama's /api routes are called only when it is Ollama.
        self.engine = ""
        # Failed upstream requests by reason, once per request (the /metrics of health.py).
        self.errors: collections.Counter[str] = collections.Counter()
        # Per-request hop timestamps (--trace-hops): set by the runner; None: off, free.
        self.trace: HopTrace | None = None
        self._connections = (connections or 4) + 4
        # The read timeout is per read (the LLM may think for minutes, but never goes
        # silent for longer); connect covers the TCP connect, not a wait for the pool.
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None,
            sock_connect=settings.llm_connect_timeout,
            sock_read=settings.llm_read_timeout,
        )
        self._head_limit = settings.llm_connect_timeout + WRITE_TIMEOUT_S
        self._head_limit += settings.llm_read_timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None:
            # aiohttp binds the pool to the running loop: made at the first call, not here.
            pool = aiohttp.TCPConnector(
                limit=self._connections,
                limit_per_host=0,
                keepalive_timeout=KEEPALIVE_S,
            )
            session = self._session = aiohttp.ClientSession(
                connector=pool,
                headers=self._headers,
                skip_auto_headers=_SKIP_AUTO_HEADERS,
                timeout=self._timeout,
                # Raw bytes through, as the LLM sent them: the broker passes them on.
                auto_decompress=False,
                read_bufsize=READ_BUFSIZE,
                # No cookies kept from one user's answer for the next user's request.
                cookie_jar=aiohttp.DummyCookieJar(),
                # The local LLM is on this machine or LAN: never through a proxy.
                trust_env=False,
            )
        return session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _failed(self, pipe: FrameSink, exc: BaseException, end: ResponseEnd) -> None:
        # The detail (URL, the library's text) stays in this log; the END frame carries a
        # fixed text, since the broker may show it to API users (URLs can hold credentials).
        self.errors[end.error_type or "upstream_error"] += 1
        log.warning(
            "upstream_request_failed",
            reason=end.error_type,
            llm_url=self.url,
            error=f"{type(exc).__name__}: {exc}",
        )
        pipe.end(end)

    async def get_json(self, path: str, timeout: float = 5.0) -> object:
        """GET ``path`` of the local LLM and decode its JSON answer."""
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else None
        # ``timeout`` for each step, as before: a free connection and the connect, each read.
        limit = aiohttp.ClientTimeout(
            total=None, connect=timeout, sock_connect=timeout, sock_read=timeout
        )
        try:
            response = await self._client().get(
                URL(self.url + path, encoded=True),
                headers=headers,
                timeout=limit,
                allow_redirects=False,
            )
            async with response:
                status, body = response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
        try:
            if status >= 400:
                raise ValueError(f"HTTP {status} from {path}")
            answer: object = json.loads(body)
        except ValueError as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}", answered=True) from exc
        return answer

    async def models(self, timeout: float = 5.0) -> list[str]:
        """The model IDs the local LLM lists at /v1/models."""
        body = await self.get_json("/v1/models", timeout)
        data = body.get("data", []) if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise UpstreamError("/v1/models answered without a data list", answered=True)
        return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]

    def url_for(self, item: RequestItem) -> URL:
        """Where ``item`` goes: its canonical /v1 path (or an allowed Ollama /api route, when
        the LLM is Ollama) under --llm-url, never anywhere else.

        The broker is not trusted with the URL: only POST, only a relative canonical path
        (``shared.paths.relay_target``), joined here as the already encoded string it is
        (parsed on its own, an absolute URL would go elsewhere, and ``..`` would resolve).
        """
        if item.method != "POST":
            raise PathRefused(400, "invalid_method", "only POST requests are relayed")
        path = relay_target(item.path, self.engine)
        if not path.isascii():
            raise PathRefused(400, "invalid_path", "the path is not plain ASCII")
        return URL(self.url + path, encoded=True)

    def _headers_for(self, item: RequestItem) -> dict[str, str]:
        headers = dict(item.headers)
        headers["accept-encoding"] = "identity"
        headers.pop(REQUEST_ID_HEADER, None)
        headers[UPSTREAM_REQUEST_ID_HEADER] = item.request_id
        if _is_uuid(item.request_id):
            # Only a UUID: llama-cpp-python's server answers 400 to any other x-request-id.
            headers[REQUEST_ID_HEADER] = item.request_id
        key = item.upstream_api_key or self.api_key
        if key:
            headers["authorization"] = f"Bearer {key}"
        for name, value in headers.items():
            if not (name.isascii() and value.isascii()):
                # HTTP headers are ASCII: refused here, before anything is sent.
                raise ValueError(f"header {name[:40]!r} is not ASCII")
        return headers

    async def pump(self, item: RequestItem, pipe: FrameSink) -> None:
        """Forward one request and push its response into ``pipe`` as frames, byte for byte.

        Every failure ends the pipe with an error frame: the API user always gets an answer.
        Cancelled (the API user went away), it closes the connection, so the LLM stops.
        """
        try:
            url = self.url_for(item)
        except PathRefused as exc:
            log.warning("request_path_refused", method=item.method[:16], reason=exc.message)
            self._failed(pipe, exc, _failure(exc.status, exc.code, f"the connector refused: {exc}"))
            return
        trace = self.trace
        if trace is not None:
            trace.mark(item.request_id, "upstream_sent")
        started = time.perf_counter()
        head_sent = False
        try:
            # Inside the try: a header that cannot be sent fails here, and must end the
            # response like any other failure.
            headers = self._headers_for(item)
            async with asyncio.timeout(self._head_limit):
                response = await self._client().post(
                    url, data=item.body, headers=headers, allow_redirects=False
                )
            try:
                pipe.head(_head(response, (time.perf_counter() - started) * 1000.0))
                head_sent = True
                if response.status >= 500:
                    self.errors["status_5xx"] += 1
                data: Callable[[bytes], None] = pipe.data
                if trace is not None:
                    trace.mark(item.request_id, "upstream_head")
                    data = trace.first(item.request_id, "upstream_first_byte", data)
                read = response.content.readany
                while chunk := await read():
                    data(chunk)
            finally:
                # Read to the end, the connection is back in the pool already; otherwise
                # (an error, a cancel) this closes it, and the LLM stops generating.
                response.close()
            pipe.end(ResponseEnd(ok=True, upstream_ms=(time.perf_counter() - started) * 1000.0))
        except Exception as exc:
            self._failed(pipe, exc, self._end_for(exc, head_sent))

    def _end_for(self, exc: Exception, head_sent: bool) -> ResponseEnd:
        """The END frame for a failed call: aiohttp's errors, converted once, here."""
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return _failure(504, "upstream_timeout", "the local LLM did not answer in time")
        if isinstance(exc, aiohttp.ClientConnectorError):
            return _failure(502, "upstream_unreachable", "cannot reach the local LLM")
        if isinstance(exc, TimeoutError):
            what = "stopped sending" if head_sent else "did not answer"
            return _failure(504, "upstream_timeout", f"the local LLM {what} in time")
        if isinstance(exc, aiohttp.ClientError):
            where = "mid-response" if head_sent else "before answering"
            return _failure(502, "upstream_error", f"the local LLM failed {where}")
        # Anything else (a bug here, an odd answer) must still end the response: without
        # an END frame the upload only sends heartbeats and the API user waits for the
        # broker's first-byte or total timeout.
        log.exception("upstream_pump_failed", head_sent=head_sent)
        where = "mid-response" if head_sent else "before the answer began"
        return _failure(502, "connector_error", f"the connector failed {where}")


def _head(response: aiohttp.ClientResponse, upstream_ms: float) -> ResponseHead:
    """The HEAD frame of ``response``, its hop-by-hop headers dropped."""
    return ResponseHead(
        status=response.status,
        headers=[
            (name.decode("latin-1"), _text(value))
            for name, value in response.raw_headers
            if name.lower() not in _DROP_RESPONSE_HEADERS
        ],
        upstream_ms=upstream_ms,
    )


def _text(value: bytes) -> str:
    # UTF-8 when it is (and ASCII always is), else one character per byte, as httpx did.
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _basic(userinfo: str) -> str:
    user, _, password = userinfo.partition(":")
    pair = f"{unquote(user)}:{unquote(password)}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _failure(status: int, error_type: str, message: str) -> ResponseEnd:
    return ResponseEnd(ok=False, status=status, error_type=error_type, error=message)
