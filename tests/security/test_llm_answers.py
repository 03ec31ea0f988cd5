"""What the local LLM answers cannot steer the connector's next requests.

A redirect is passed on to the API user, never followed (the URL rule: every request goes
to --llm-url); a Set-Cookie in one user's answer is never sent with a later request. A
real aiohttp server on 127.0.0.1 plays the LLM, ``connector.upstream`` calls it.
"""

from __future__ import annotations

import json

from aiohttp import web

from connector.pipe import FramePipe
from connector.settings import ConnectorSettings
from connector.upstream import Upstream
from shared.framing import FrameDecoder, FrameType
from shared.protocol import RequestItem, ResponseEnd, ResponseHead
from tests.support.scripted_llm import scripted_llm

ITEM = RequestItem(request_id="r-1", model="m", path="/v1/chat/completions", body=b"{}")


async def _answer(request: web.Request) -> web.StreamResponse:
    if request.headers.get("x-case") == "redirect":
        return web.Response(
            status=307, body=b"moved", headers={"location": "http://127.0.0.1:9/v1/x"}
        )
    response = web.Response(body=b"{}")
    response.set_cookie("session", "user-a-secret")
    return response


async def _frames(upstream: Upstream, case: str) -> tuple[ResponseHead, ResponseEnd]:
    pipe = FramePipe(heartbeat=10)
    await upstream.pump(ITEM.model_copy(update={"headers": {"x-case": case}}), pipe)
    frames = list(FrameDecoder().feed(pipe.drain()))
    assert [f.type for f in frames] == [FrameType.HEAD, FrameType.DATA, FrameType.END]
    head = ResponseHead.model_validate(json.loads(frames[0].payload))
    return head, ResponseEnd.model_validate(json.loads(frames[-1].payload))


async def test_redirects_are_passed_on_and_cookies_never_kept() -> None:
    async with scripted_llm(_answer) as llm:
        settings = ConnectorSettings(broker_url="http://b", broker_token="t", llm_url=llm.url)
        upstream = Upstream(settings)
        try:
            redirect, end = await _frames(upstream, "redirect")
            await _frames(upstream, "cookie")
            await _frames(upstream, "cookie")
        finally:
            await upstream.aclose()
    assert (redirect.status, end.ok) == (307, True)
    assert [seen.target for seen in llm.seen] == ["/v1/chat/completions"] * 3
    assert all("cookie" not in seen.headers for seen in llm.seen)
