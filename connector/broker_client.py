"""HTTP calls from the connector to the broker's relay (``/relay/v1``), over httpx.

httpx errors are converted here into ``connector.errors``; nothing above this module sees
an httpx exception. Idempotent calls (register, poll, parts) are retried once on a fresh
connection when a kept-alive connection turns out dead.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import httpx
from pydantic import ValidationError

from connector.errors import BrokerRejected, BrokerUnavailable, LeaseLost, SessionLost
from connector.settings import ConnectorSettings
from shared.logging import get_logger
from shared.protocol import (
    RELAY_PREFIX,
    ModelsUpdate,
    PollResponse,
    ProbeResult,
    RegisterRequest,
    RegisterResponse,
    UploadResult,
    WorkItem,
)

log = get_logger("connector.broker")

T = TypeVar("T")


def tls_verify(settings: ConnectorSettings) -> ssl.SSLContext | bool:
    """What httpx verifies the broker with: an explicit CA bundle, or the default store."""
    if settings.insecure:
        log.warning("tls_verification_disabled", broker_url=settings.broker_url)
        return False
    if settings.ca_bundle is not None:
        return ssl.create_default_context(cafile=str(settings.ca_bundle))
    return True


def _raise_for(response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    detail = _message(response)
    if status == 404:
        raise SessionLost(detail)
    if status == 409:
        raise LeaseLost(detail)
    if status in (400, 401, 403):
        raise BrokerRejected(f"HTTP {status}: {detail}")
    raise BrokerUnavailable(f"HTTP {status}: {detail}")


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


class BrokerClient:
    def __init__(
        self,
        settings: ConnectorSettings,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.base = settings.broker_url + RELAY_PREFIX
        self._client = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {settings.broker_token}"},
            timeout=httpx.Timeout(connect=15.0, read=60.0, write=60.0, pool=None),
            limits=httpx.Limits(
                max_connections=settings.capacity * 2 + 8,
                max_keepalive_connections=settings.capacity + 4,
                keepalive_expiry=30.0,
            ),
            proxy=settings.proxy,
            verify=tls_verify(settings),
            http2=settings.http2,
            transport=transport,
            trust_env=True,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """One retry on a fresh connection for connection-level failures."""
        try:
            return await call()
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            log.debug("broker_call_retry", error=type(exc).__name__)
            return await call()

    async def _send(
        self, method: str, path: str, *, content: bytes | None = None, timeout: float | None = None
    ) -> httpx.Response:
        async def call() -> httpx.Response:
            return await self._client.request(
                method,
                self.base + path,
                content=content,
                headers={"content-type": "application/json"} if content is not None else None,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )

        try:
            response = await self._retrying(call)
        except httpx.HTTPError as exc:
            raise BrokerUnavailable(describe(exc)) from exc
        _raise_for(response)
        return response

    async def register(self, req: RegisterRequest) -> RegisterResponse:
        response = await self._send("POST", "/sessions", content=req.model_dump_json().encode())
        try:
            return RegisterResponse.model_validate_json(response.content)
        except ValidationError as exc:
            raise BrokerRejected(f"unexpected registration answer: {exc}") from exc

    async def deregister(self, session_id: str) -> None:
        await self._send("DELETE", f"/sessions/{session_id}", timeout=5.0)

    async def update_models(self, session_id: str, models: list[str]) -> None:
        body = ModelsUpdate(models=models).model_dump_json().encode()
        await self._send("PUT", f"/sessions/{session_id}/models", content=body)

    async def poll(self, session_id: str, hold: float) -> list[WorkItem]:
        # Read timeout = hold + 15 s: a poll answered late is still a poll.
        response = await self._send(
            "POST", f"/sessions/{session_id}/poll", content=b"{}", timeout=hold + 15.0
        )
        try:
            return PollResponse.model_validate_json(response.content).items
        except ValidationError as exc:
            raise BrokerRejected(f"unexpected poll answer: {exc}") from exc

    async def upload_stream(
        self, session_id: str, request_id: str, body: AsyncIterator[bytes]
    ) -> UploadResult:
        """Stream mode: one chunked POST carrying every frame of the response."""
        try:
            response = await self._client.post(
                f"{self.base}/sessions/{session_id}/responses/{request_id}",
                content=body,
                headers={"content-type": "application/octet-stream"},
                timeout=httpx.Timeout(connect=15.0, read=None, write=None, pool=None),
            )
        except httpx.HTTPError as exc:
            raise BrokerUnavailable(describe(exc)) from exc
        _raise_for(response)
        return _result(response)

    async def upload_part(
        self, session_id: str, request_id: str, seq: int, data: bytes
    ) -> UploadResult:
        """Parts mode: one part; safe to repeat (the broker drops a repeated sequence number)."""
        url = f"{self.base}/sessions/{session_id}/responses/{request_id}/parts/{seq}"
        last: Exception | None = None
        for attempt in range(4):
            try:
                response = await self._client.post(
                    url, content=data, headers={"content-type": "application/octet-stream"}
                )
            except httpx.HTTPError as exc:
                last = exc
                await asyncio.sleep(0.05 * (2**attempt))
                continue
            if response.status_code >= 500:
                last = BrokerUnavailable(f"HTTP {response.status_code}")
                await asyncio.sleep(0.05 * (2**attempt))
                continue
            _raise_for(response)
            return _result(response)
        assert last is not None
        raise BrokerUnavailable(describe(last)) from last

    async def probe(self, pieces: int = 3, gap: float = 0.3) -> ProbeResult:
        """Send a chunked body in pieces ``gap`` apart; the broker says how they arrived."""

        async def body() -> AsyncIterator[bytes]:
            for i in range(pieces):
                if i:
                    await asyncio.sleep(gap)
                yield b"probe" * 20

        try:
            response = await self._client.post(
                f"{self.base}/probe",
                content=body(),
                headers={"content-type": "application/octet-stream"},
            )
        except httpx.HTTPError as exc:
            raise BrokerUnavailable(describe(exc)) from exc
        _raise_for(response)
        return ProbeResult.model_validate_json(response.content)


def _result(response: httpx.Response) -> UploadResult:
    try:
        return UploadResult.model_validate_json(response.content)
    except ValidationError:
        return UploadResult(status="ok")


def describe(exc: Exception) -> str:
    """A one-line reason for a network error, with the TLS cause when there is one."""
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        text = f"TLS certificate verification failed: {cause.verify_message}"
    return f"{type(exc).__name__}: {text}"
