"""How the connector reads the broker's answers: which error, and how long to wait after it.

``BrokerClient`` over an ``httpx.MockTransport`` (no sockets); ``retry_cap`` decides the
longest wait before the next try.
"""

from __future__ import annotations

import json

import httpx
import pytest

from connector.broker_client import BrokerClient
from connector.errors import (
    BrokerRejected,
    BrokerUnavailable,
    LeaseLost,
    SessionLost,
    SessionReplaced,
)
from connector.settings import ConnectorSettings
from connector.trouble import UNREACHABLE_RETRY, by_proxy, retry_cap


def _error(status: int, code: str | None, message: str = "m") -> httpx.Response:
    body = {"error": {"message": message, "type": "relay_error", "param": None, "code": code}}
    return httpx.Response(status, content=json.dumps(body).encode())


def _client(answer: httpx.Response | Exception) -> BrokerClient:
    def handle(request: httpx.Request) -> httpx.Response:
        if isinstance(answer, Exception):
            raise answer
        return answer

    settings = ConnectorSettings(broker_url="http://b", broker_token="t", name="n")
    return BrokerClient(settings, transport=httpx.MockTransport(handle))


@pytest.mark.parametrize(
    ("answer", "error", "status", "from_broker"),
    [
        (_error(404, "session_replaced"), SessionReplaced, None, None),
        (_error(404, "session_unknown"), SessionLost, None, None),
        (_error(409, "lease_lost"), LeaseLost, None, None),
        (_error(401, "invalid_token"), BrokerRejected, None, None),
        (_error(503, "shutting_down"), BrokerUnavailable, 503, True),
        (_error(500, None), BrokerUnavailable, 500, True),
        (httpx.Response(502, content=b"<html>bad gateway</html>"), BrokerUnavailable, 502, False),
        (httpx.Response(413, content=b"too large"), BrokerUnavailable, 413, False),
        (httpx.ConnectError("refused"), BrokerUnavailable, None, False),
    ],
)
async def test_answers_become_errors(
    answer: httpx.Response | Exception,
    error: type[Exception],
    status: int | None,
    from_broker: bool | None,
) -> None:
    client = _client(answer)
    try:
        with pytest.raises(error) as info:
            await client.update_models("s-1", ["m"])
    finally:
        await client.aclose()
    assert type(info.value) is error
    if isinstance(info.value, BrokerUnavailable):
        assert (info.value.status, info.value.from_broker) == (status, from_broker)


@pytest.mark.parametrize(
    ("exc", "cap", "proxy"),
    [
        (BrokerUnavailable("ConnectError: refused"), UNREACHABLE_RETRY, False),
        (BrokerUnavailable("HTTP 502", status=502), UNREACHABLE_RETRY, True),
        (BrokerUnavailable("HTTP 504", status=504), UNREACHABLE_RETRY, True),
        (BrokerUnavailable("HTTP 503", status=503, from_broker=True), None, False),
        (BrokerUnavailable("HTTP 500", status=500, from_broker=True), None, False),
        (BrokerUnavailable("HTTP 413", status=413), None, True),
        (BrokerRejected("HTTP 401"), None, None),
    ],
)
def test_retry_cap_short_only_while_nothing_answers(
    exc: Exception, cap: float | None, proxy: bool | None
) -> None:
    assert retry_cap(exc) == cap
    if isinstance(exc, BrokerUnavailable):
        assert by_proxy(exc) is proxy
