"""HTTP calls from the connector to the broker's relay (``/relay/v1``), over httpx.

httpx errors are converted here into ``connector.errors``; nothing above this module sees
an httpx exception. Idempotent calls (register, poll, parts) are retried once on a fresh
connection when a kept-alive connection turns out dead.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from connector import tls
from connector.errors import (
    BrokerRejected,
    BrokerUnavailable,
    CertificateError,
    EnrollmentRefused,
    LeaseLost,
    SessionLost,
    SessionReplaced,
)
from connector.netbackend import fast_transport
from connector.proxy import choose_proxy
from connector.settings import ConnectorSettings
from shared.logging import get_logger
from shared.protocol import (
    RELAY_PREFIX,
    SESSION_REPLACED,
    EnrollRequest,
    EnrollResponse,
    ModelsUpdate,
    ModelsUpdated,
    PollResponse,
    ProbeResult,
    RefusedModel,
    RegisterRequest,
    RegisterResponse,
    UploadResult,
    WorkItem,
)

log = get_logger("connector.broker")

T = TypeVar("T")


# A poll that fails after being held this long was cut by something on the way (a proxy's
# idle timeout), not refused: it is re-issued at once instead of backing off.
POLL_CUT_AFTER = 1.0
_CUT_STATUSES = frozenset({502, 503, 504})


def tls_verify(settings: ConnectorSettings) -> ssl.SSLContext | bool:
    """What httpx verifies the broker with (see ``connector.tls``); never off silently."""
    trust = tls.trust_for(settings)
    if trust.context is None:
        log.warning(
            "tls_verification_disabled",
            broker_url=settings.broker_url,
            message="--insecure: the broker's TLS certificate is NOT verified; anyone on the "
            "path can read and change the relayed traffic. Use --ca-bundle instead.",
        )
        return False
    return trust.context


def _raise_for(response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    own = _broker_error(response)
    detail = own[0] if own is not None else _not_broker(response)
    if status == 404:
        if own is not None and own[1] == SESSION_REPLACED:
            raise SessionReplaced(detail)
        raise SessionLost(detail)
    if status == 409:
        raise LeaseLost(detail)
    if status == 407:
        raise BrokerRejected(
            f"HTTP 407: the proxy wants credentials: give them as user:pass@ in --proxy or "
            f"HTTPS_PROXY ({detail})"
        )
    if status in (400, 401, 403):
        raise BrokerRejected(f"HTTP {status}: {detail}")
    raise BrokerUnavailable(f"HTTP {status}: {detail}", status=status, from_broker=own is not None)


def _broker_error(response: httpx.Response) -> tuple[str, str | None] | None:
    """The message and code of the broker's own JSON error, or None (someone else answered)."""
    try:
        error = response.json()["error"]
        code = error.get("code")
        return str(error["message"]), (str(code) if code is not None else None)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _not_broker(response: httpx.Response) -> str:
    # The broker answers errors in JSON: anything else came from something on the way.
    server = response.headers.get("server") or response.headers.get("via") or "unknown"
    reason = response.reason_phrase or "error"
    return f"{reason}, answered by {server}, not by the broker (a proxy on the way?)"


class BrokerClient:
    def __init__(
        self,
        settings: ConnectorSettings,
        transport: httpx.AsyncBaseTransport | None = None,
        connections: int = 4,
    ) -> None:
        self.settings = settings
        self.base = settings.broker_url + RELAY_PREFIX
        self.poll_cuts = 0
        self._cert_hint: str | None = None
        proxy = choose_proxy(settings.broker_url, settings.proxy)
        if proxy.url is not None and transport is None:
            log.info("broker_proxy", proxy=proxy.shown, source=proxy.source)
        if transport is None:
            # The proxy is resolved above (--proxy, or the environment with NO_PROXY), so
            # the transport gets it explicitly and the client does not read the env again.
            transport = fast_transport(
                connections * 2 + 8,
                keepalive_expiry=30.0,
                proxy=proxy.url,
                verify=tls_verify(settings),
                http2=settings.http2,
            )
        # No token yet: the only call that works is enroll (connector/enroll.py).
        token = settings.broker_token
        self._client = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {token}"} if token else {},
            timeout=httpx.Timeout(connect=15.0, read=60.0, write=60.0, pool=None),
            transport=transport,
            trust_env=False,
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
            raise await self._unavailable(exc) from exc
        _raise_for(response)
        return response

    async def _unavailable(self, exc: Exception) -> BrokerUnavailable | CertificateError:
        """The error to raise for a failed call; a certificate problem is explained once."""
        error = tls.cert_error(exc)
        if error is None:
            return BrokerUnavailable(describe(exc))
        if self._cert_hint is None:
            # One extra, unverified handshake to read who issued what we were shown.
            proxy = choose_proxy(self.settings.broker_url, self.settings.proxy).url
            info = await tls.inspect_certificate(self.settings.broker_url, proxy)
            url = urlsplit(self.settings.broker_url)
            self._cert_hint = tls.explain(error, f"{url.hostname}:{url.port or 443}", info)
        return CertificateError(self._cert_hint)

    async def register(self, req: RegisterRequest) -> RegisterResponse:
        response = await self._send("POST", "/sessions", content=req.model_dump_json().encode())
        self._cert_hint = None
        try:
            return RegisterResponse.model_validate_json(response.content)
        except ValidationError as exc:
            raise BrokerRejected(f"unexpected registration answer: {exc}") from exc

    async def enroll(self, req: EnrollRequest) -> EnrollResponse:
        """Ask to join (docs/enrollment.md): pending, the token once approved, or refused."""

        async def call() -> httpx.Response:
            return await self._client.post(
                self.base + "/enroll",
                content=req.model_dump_json().encode(),
                headers={"content-type": "application/json"},
            )

        try:
            response = await self._retrying(call)
        except httpx.HTTPError as exc:
            raise await self._unavailable(exc) from exc
        status = response.status_code
        if status in (200, 202, 403):
            try:
                reply = EnrollResponse.model_validate_json(response.content)
            except ValidationError:
                _raise_for(response)  # someone else's 403 (a proxy): say who
                raise BrokerRejected(f"unexpected enrollment answer (HTTP {status})") from None
            if status == 403:
                raise EnrollmentRefused(reply.message)
            return reply
        own = _broker_error(response)
        if status == 401 and own is not None:
            raise EnrollmentRefused(own[0])
        if status == 429 or (status == 503 and own is not None):
            raise BrokerUnavailable(
                f"HTTP {status}: {own[0] if own else 'busy'}", status=status, from_broker=True
            )
        _raise_for(response)
        raise BrokerRejected(f"unexpected enrollment answer (HTTP {status})")

    async def deregister(self, session_id: str) -> None:
        await self._send("DELETE", f"/sessions/{session_id}", timeout=5.0)

    async def update_models(self, session_id: str, models: list[str]) -> list[RefusedModel]:
        """Send the served models; the answer names those this token may not serve."""
        body = ModelsUpdate(models=models).model_dump_json().encode()
        response = await self._send("PUT", f"/sessions/{session_id}/models", content=body)
        if response.status_code == 204 or not response.content:
            return []  # an older broker
        try:
            return ModelsUpdated.model_validate_json(response.content).refused
        except ValidationError as exc:
            raise BrokerRejected(f"unexpected models update answer: {exc}") from exc

    async def poll(self, session_id: str, hold: float) -> list[WorkItem]:
        # Read timeout = hold + 15 s: a poll answered late is still a poll.
        started = time.monotonic()
        try:
            response = await self._send(
                "POST", f"/sessions/{session_id}/poll", content=b"{}", timeout=hold + 15.0
            )
        except BrokerUnavailable as exc:
            held = time.monotonic() - started
            if held < POLL_CUT_AFTER or not _is_cut(exc):
                raise
            # A proxy's idle timeout ended the held poll: ask again at once. Work the broker
            # handed to the cut poll is not lost: its lease expires and it is handed out again.
            self.poll_cuts += 1
            log.info("poll_cut", held_s=round(held, 1), error=str(exc), cuts=self.poll_cuts)
            return []
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

    async def upload_mux(self, session_id: str, body: AsyncIterator[bytes]) -> UploadResult:
        """The multiplexed upload (``connector.mux``): one long chunked POST, many responses."""
        try:
            response = await self._client.post(
                f"{self.base}/sessions/{session_id}/mux",
                content=body,
                headers={"content-type": "application/octet-stream"},
                timeout=httpx.Timeout(connect=15.0, read=60.0, write=None, pool=None),
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
                last = BrokerUnavailable(
                    f"HTTP {response.status_code}",
                    status=response.status_code,
                    from_broker=_broker_error(response) is not None,
                )
                await asyncio.sleep(0.05 * (2**attempt))
                continue
            _raise_for(response)
            return _result(response)
        if isinstance(last, BrokerUnavailable):
            raise last
        assert last is not None
        raise BrokerUnavailable(describe(last)) from last

    async def probe_download(self) -> float:
        """How far apart (ms) three response pieces sent 300 ms apart arrived."""
        arrivals: list[float] = []
        try:
            async with self._client.stream("GET", f"{self.base}/probe") as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for(response)
                async for chunk in response.aiter_raw():
                    if chunk:
                        arrivals.append(time.perf_counter())
        except httpx.HTTPError as exc:
            raise await self._unavailable(exc) from exc
        return (arrivals[-1] - arrivals[0]) * 1000.0 if arrivals else 0.0

    async def poll_stream(
        self, session_id: str, hold: float, on_items: Callable[[list[WorkItem]], None]
    ) -> None:
        """Fast path: one poll whose answer carries batches of items, one JSON line each."""
        started = time.monotonic()
        url = f"{self.base}/sessions/{session_id}/poll?stream=1"
        timeout = httpx.Timeout(connect=15.0, read=hold + 15.0, write=60.0, pool=None)
        try:
            async with self._client.stream(
                "POST",
                url,
                content=b"{}",
                headers={"content-type": "application/json"},
                timeout=timeout,
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for(response)
                pending = b""
                async for chunk in response.aiter_raw():
                    pending += chunk
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        if line.strip():
                            on_items(PollResponse.model_validate_json(line).items)
            held = time.monotonic() - started
            if POLL_CUT_AFTER <= held < hold - 1.0:
                # The answer ended well before its hold: a proxy closed it (or the broker
                # is shutting down). Either way the next poll goes out at once.
                self.poll_cuts += 1
                log.info("poll_cut", held_s=round(held, 1), error="answer ended early")
        except ValidationError as exc:
            raise BrokerRejected(f"unexpected poll answer: {exc}") from exc
        except (httpx.HTTPError, BrokerUnavailable) as exc:
            # A proxy's gateway timeout (504) or a dropped connection ends a held poll.
            error = exc if isinstance(exc, BrokerUnavailable) else await self._unavailable(exc)
            if error is not exc:
                error.__cause__ = exc
            held = time.monotonic() - started
            if (
                held < POLL_CUT_AFTER
                or not isinstance(error, BrokerUnavailable)
                or not _is_cut(error)
            ):
                raise error from exc
            self.poll_cuts += 1
            log.info("poll_cut", held_s=round(held, 1), error=str(error), cuts=self.poll_cuts)

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
            raise await self._unavailable(exc) from exc
        _raise_for(response)
        try:
            return ProbeResult.model_validate_json(response.content)
        except ValidationError as exc:
            raise BrokerRejected(f"unexpected probe answer: {exc}") from exc


def _result(response: httpx.Response) -> UploadResult:
    try:
        return UploadResult.model_validate_json(response.content)
    except ValidationError:
        return UploadResult(status="ok")


def describe(exc: Exception) -> str:
    """A one-line reason for a network error, with the TLS cause when there is one."""
    text = str(exc) or type(exc).__name__
    cause = tls.cert_error(exc)
    if cause is not None:
        text = f"TLS certificate verification failed: {cause.verify_message}"
    return f"{type(exc).__name__}: {text}"


def _is_cut(exc: BrokerUnavailable) -> bool:
    """A held connection ended by the path: a dropped connection or a gateway timeout."""
    cause = exc.__cause__
    if isinstance(cause, httpx.RemoteProtocolError | httpx.ReadError | httpx.ReadTimeout):
        return True
    return exc.status in _CUT_STATUSES
