"""aiohttp's errors become the httpx errors that say what happened (connector/llm_transport.py)."""

from __future__ import annotations

import aiohttp
import httpx
import pytest

from connector.llm_transport import _convert


def _wrapped(cause: BaseException) -> httpx.TransportError:
    # What httpx-aiohttp 0.2 raises for any ClientConnectionError: ConnectTimeout.
    try:
        raise httpx.ConnectTimeout(str(cause)) from cause
    except httpx.ConnectTimeout as exc:
        return exc


@pytest.mark.parametrize(
    ("cause", "expected"),
    [
        (aiohttp.ServerDisconnectedError(), httpx.RemoteProtocolError),
        (aiohttp.ClientPayloadError("cut"), httpx.ReadError),
        (aiohttp.SocketTimeoutError("slow"), httpx.ReadTimeout),
        (aiohttp.ConnectionTimeoutError("slow connect"), httpx.ConnectTimeout),
        (aiohttp.ClientOSError(104, "reset"), httpx.ReadError),
        (TimeoutError(), httpx.ReadTimeout),
    ],
)
@pytest.mark.parametrize("wrapped", [False, True])
def test_aiohttp_errors_are_converted(cause: BaseException, expected: type, wrapped: bool) -> None:
    converted = _convert(_wrapped(cause) if wrapped else cause)
    assert type(converted) is expected
    assert type(cause).__name__ in str(converted)


def test_other_errors_pass_through() -> None:
    err = httpx.UnsupportedProtocol("ftp://")
    assert _convert(err) is err
