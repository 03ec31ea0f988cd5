"""A relayed response is freed when it ends, not at the next full garbage collection.

A response left in a reference cycle (as httpx's response and stream once were) keeps the
whole aiohttp response (reader, buffers) until a rare full collection, which raised the
connector's peak RSS at 1,000 streams (docs/performance.md, "A lighter process"). A real
local LLM (the fake one, on a socket) and the real client.
"""

from __future__ import annotations

import gc

import aiohttp

from connector.pipe import FramePipe
from connector.settings import ConnectorSettings
from connector.upstream import Upstream
from shared.bench.upstream import FakeLLM
from shared.protocol import RequestItem

STREAM = '{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'


async def test_finished_responses_leave_no_reference_cycle(fake_llm: FakeLLM) -> None:
    settings = ConnectorSettings(broker_url="http://b", broker_token="t", llm_url=fake_llm.url)
    upstream = Upstream(settings)
    gc.collect()
    gc.disable()
    try:
        for n in range(5):
            item = RequestItem(
                request_id=f"r-{n}", model="m", path="/v1/chat/completions", body=STREAM
            )
            pipe = FramePipe(heartbeat=10)
            await upstream.pump(item, pipe)
            assert pipe.ended and b"data:" in pipe.drain()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [
            o for o in gc.garbage if isinstance(o, aiohttp.ClientResponse | aiohttp.StreamReader)
        ]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        await upstream.aclose()
    assert left == []
