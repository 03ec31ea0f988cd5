"""Calls to the local LLM (any OpenAI-compatible server) and the per-request pump."""

from __future__ import annotations

import base64
import collections
import time
import uuid
from collections.abc import Callable
from urllib.parse import unquote

import httpx

from connector.llm_transport import llm_transport
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


class UpstreamError(Exception):
    """A call to the local LLM failed; ``answered``: it did answer (an HTTP error, bad JSON)."""

    def __init__(self, message: str, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered


log = get_logger("connector.upstream")


_DROP_RESPONSE_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding"})


class Upstream:
    def __init__(
        self,
        settings: ConnectorSettings,
        transport: httpx.AsyncBaseTransport | None = None,
        connections: int | None = None,
    ) -> None:
        # Credentials in the URL become a default Basic header: the URL itself (logged,
        # shown by /health) never carries them, and aiohttp refuses a URL with both.
        base = httpx.URL(settings.llm_url)
        headers: dict[str, str] = {}
        if base.userinfo:
            headers["authorization"] = _basic(base.userinfo.decode("ascii"))
            base = base.copy_with(userinfo=b"")
        self.url = str(base).rstrip("/")
        self.api_key = settings.llm_api_key
        # What the LLM is ("ollama/0.6.2", "" for OpenAI-only), set by connector/engine.py
        # at each registration: Ollama's /api routes are called only when it is Ollama.
        self.engine = ""
        # Failed upstream requests by reason, once per request (the /metrics of health.py).
        self.errors: collections.Counter[str] = collections.Counter()
        # Per-request hop timestamps (--trace-hops): set by the runner; None: off, free.
        self.trace: HopTrace | None = None
        self._client = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(
                connect=settings.llm_connect_timeout,
                read=settings.llm_read_timeout,
                write=60.0,
                pool=None,
            ),
            transport=transport or llm_transport((connections or 4) + 4),
            # The local LLM is on this machine or LAN: never send it through the proxy.
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def _failed(self, pipe: FrameSink, exc: Exception, end: ResponseEnd) -> None:
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
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        try:
            response = await self._client.get(path, headers=headers, timeout=timeout)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
        try:
            response.raise_for_status()
            body: object = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}", answered=True) from exc
        return body

    async def models(self, timeout: float = 5.0) -> list[str]:
        """The model IDs the local LLM lists at /v1/models."""
        body = await self.get_json("/v1/models", timeout)
        data = body.get("data", []) if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise UpstreamError("/v1/models answered without a data list", answered=True)
        return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]

    def url_for(self, item: RequestItem) -> httpx.URL:
        """Where ``item`` goes: its canonical /v1 path (or an allowed Ollama /api route, when
        the LLM is Ollama) under --llm-url, never anywhere else.

        The broker is not trusted with the URL: only POST, only a relative canonical path
        (``shared.paths.relay_target``), joined here (httpx would take an absolute URL as
        is, and resolve ``..``).
        """
        if item.method != "POST":
            raise PathRefused(400, "invalid_method", "only POST requests are relayed")
        path = relay_target(item.path, self.engine)
        base = self._client.base_url
        return base.copy_with(raw_path=base.raw_path.rstrip(b"/") + path.encode("ascii"))

    async def pump(self, item: RequestItem, pipe: FrameSink) -> None:
        """Forward one request and push its response into ``pipe`` as frames, byte for byte.

        Every failure ends the pipe with an error frame: the API user always gets an answer.
        """
        try:
            url = self.url_for(item)
        except PathRefused as exc:
            log.warning("request_path_refused", method=item.method[:16], reason=exc.message)
            self._failed(pipe, exc, _failure(exc.status, exc.code, f"the connector refused: {exc}"))
            return
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
        trace = self.trace
        if trace is not None:
            trace.mark(item.request_id, "upstream_sent")
        started = time.perf_counter()
        head_sent = False
        try:
            # Inside the try: a header httpx cannot encode fails here, and must end the
            # response like any other failure.
            request = self._client.build_request("POST", url, content=item.body, headers=headers)
            response = await self._client.send(request, stream=True)
            try:
                upstream_ms = (time.perf_counter() - started) * 1000.0
                pipe.head(
                    ResponseHead(
                        status=response.status_code,
                        headers=[
                            (k, v)
                            for k, v in response.headers.items()
                            if k.lower() not in _DROP_RESPONSE_HEADERS
                        ],
                        upstream_ms=upstream_ms,
                    )
                )
                head_sent = True
                if response.status_code >= 500:
                    self.errors["status_5xx"] += 1
                data: Callable[[bytes], None] = pipe.data
                if trace is not None:
                    trace.mark(item.request_id, "upstream_head")
                    data = trace.first(item.request_id, "upstream_first_byte", data)
                async for chunk in response.aiter_raw():
                    data(chunk)
            finally:
                await response.aclose()
                # httpx's response and its stream point at each other: a cycle that would
                # keep the whole aiohttp response until a full collection (the connector's
                # peak RSS at 1,000 streams). Cut it, and reference counting frees it now.
                response.stream = _SPENT
            pipe.end(ResponseEnd(ok=True, upstream_ms=(time.perf_counter() - started) * 1000.0))
        except httpx.ConnectError as exc:
            self._failed(
                pipe, exc, _failure(502, "upstream_unreachable", "cannot reach the local LLM")
            )
        except httpx.TimeoutException as exc:
            what = "stopped sending" if head_sent else "did not answer"
            self._failed(
                pipe, exc, _failure(504, "upstream_timeout", f"the local LLM {what} in time")
            )
        except httpx.HTTPError as exc:
            where = "mid-response" if head_sent else "before answering"
            self._failed(
                pipe, exc, _failure(502, "upstream_error", f"the local LLM failed {where}")
            )
        except Exception as exc:
            # Anything else (a bug here, an odd transport) must still end the response:
            # without an END frame the upload only sends heartbeats and the API user waits
            # for the broker's first-byte or total timeout.
            log.exception("upstream_pump_failed", head_sent=head_sent)
            where = "mid-response" if head_sent else "before the answer began"
            self._failed(
                pipe, exc, _failure(502, "connector_error", f"the connector failed {where}")
            )


_SPENT = httpx.ByteStream(b"")


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
