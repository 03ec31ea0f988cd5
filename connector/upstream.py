"""Calls to the local LLM (any OpenAI-compatible server) and the per-request pump."""

from __future__ import annotations

import time
import uuid

import httpx

from connector.netbackend import fast_transport
from connector.pipe import FramePipe
from connector.settings import ConnectorSettings
from shared.protocol import (
    REQUEST_ID_HEADER,
    UPSTREAM_REQUEST_ID_HEADER,
    RequestItem,
    ResponseEnd,
    ResponseHead,
)


class UpstreamError(Exception):
    pass


_DROP_RESPONSE_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding"})


class Upstream:
    def __init__(
        self, settings: ConnectorSettings, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.url = settings.llm_url
        self.api_key = settings.llm_api_key
        self._client = httpx.AsyncClient(
            base_url=settings.llm_url,
            timeout=httpx.Timeout(
                connect=settings.llm_connect_timeout,
                read=settings.llm_read_timeout,
                write=60.0,
                pool=None,
            ),
            transport=transport or fast_transport(settings.capacity + 4),
            # The local LLM is on this machine or LAN: never send it through the proxy.
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def models(self, timeout: float = 5.0) -> list[str]:
        """The model IDs the local LLM lists at /v1/models."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        try:
            response = await self._client.get("/v1/models", headers=headers, timeout=timeout)
            response.raise_for_status()
            data = response.json().get("data", [])
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
        return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]

    async def pump(self, item: RequestItem, pipe: FramePipe) -> None:
        """Forward one request and push its response into ``pipe`` as frames, byte for byte.

        Every failure ends the pipe with an error frame: the API user always gets an answer.
        """
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
        started = time.perf_counter()
        request = self._client.build_request(
            item.method, item.path, content=item.body.encode(), headers=headers
        )
        head_sent = False
        try:
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
                data = pipe.data
                async for chunk in response.aiter_raw():
                    data(chunk)
            finally:
                await response.aclose()
            pipe.end(ResponseEnd(ok=True, upstream_ms=(time.perf_counter() - started) * 1000.0))
        except httpx.ConnectError as exc:
            pipe.end(
                _failure(
                    502, "upstream_unreachable", f"cannot reach the local LLM at {self.url}: {exc}"
                )
            )
        except httpx.TimeoutException as exc:
            what = "stopped sending" if head_sent else "did not answer"
            pipe.end(
                _failure(
                    504, "upstream_timeout", f"the local LLM {what} in time ({type(exc).__name__})"
                )
            )
        except httpx.HTTPError as exc:
            where = "mid-response" if head_sent else "before answering"
            pipe.end(
                _failure(
                    502,
                    "upstream_error",
                    f"the local LLM failed {where}: {type(exc).__name__}: {exc}",
                )
            )


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _failure(status: int, error_type: str, message: str) -> ResponseEnd:
    return ResponseEnd(ok=False, status=status, error_type=error_type, error=message)
