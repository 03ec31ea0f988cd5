"""Capacity from the engine's answers (``connector.capacity``), and the calls that get them."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from aiohttp import web

from connector import capacity
from connector.capacity import AUTO_MAX, DEFAULT_CAPACITY, Capacity, from_engine
from connector.settings import ConnectorSettings
from connector.upstream import Upstream, UpstreamError
from tests.support.net import free_port
from tests.support.scripted_llm import scripted_llm

SLOT = {"id": 0, "n_ctx": 4096, "is_processing": False}


@pytest.mark.parametrize(
    ("props", "slots", "expected"),
    [
        ({"total_slots": 4, "model_path": "m.gguf"}, None, (4, "llama.cpp /props total_slots")),
        ({"total_slots": 1}, [SLOT, SLOT], (1, "llama.cpp /props total_slots")),  # props win
        ({"model_path": "m.gguf"}, [SLOT, SLOT], (2, "llama.cpp /slots")),
        (None, [SLOT] * 8, (8, "llama.cpp /slots")),
        ({"total_slots": 0}, None, (DEFAULT_CAPACITY, None)),
        ({"total_slots": -1}, None, (DEFAULT_CAPACITY, None)),
        ({"total_slots": True}, None, (DEFAULT_CAPACITY, None)),
        ({"total_slots": "4"}, None, (DEFAULT_CAPACITY, None)),
        ({"total_slots": 4.0}, None, (DEFAULT_CAPACITY, None)),
        (None, [], (DEFAULT_CAPACITY, None)),
        (None, {"slots": 3}, (DEFAULT_CAPACITY, None)),
        ([1, 2], "x", (DEFAULT_CAPACITY, None)),
        (None, None, (DEFAULT_CAPACITY, None)),
        ({"total_slots": 500}, None, (AUTO_MAX, "capped")),
        (None, [SLOT] * 300, (AUTO_MAX, "capped")),
    ],
)
def test_engine_answers_map_to_capacity(
    props: object, slots: object, expected: tuple[int, str | None]
) -> None:
    value, source = expected
    found = from_engine(props, slots)
    assert found.value == value
    assert found.detected
    if source is None:
        assert found.source.startswith("default")
    else:
        assert source in found.source


def test_configured_and_initial() -> None:
    assert capacity.initial(12) == Capacity(12, "--capacity")
    start = capacity.initial("auto")
    assert (start.value, start.detected) == (DEFAULT_CAPACITY, False)
    assert capacity.pool_size(12) == 12
    assert capacity.pool_size("auto") == AUTO_MAX


def _upstream(url: str) -> Upstream:
    settings = ConnectorSettings(broker_url="http://b", broker_token="t", llm_url=url)
    return Upstream(settings)


Answer = tuple[int, bytes]


def _json(status: int, body: object) -> Answer:
    return status, json.dumps(body).encode()


@pytest.mark.parametrize(
    ("routes", "expected", "asked"),
    [
        # llama.cpp's llama-server: /props says it all, /slots is not asked.
        ({"/props": _json(200, {"total_slots": 6})}, (6, True), ["/props"]),
        # /props without slots (an older server): count /slots.
        (
            {"/props": _json(200, {"x": 1}), "/slots": _json(200, [SLOT] * 3)},
            (3, True),
            ["/props", "/slots"],
        ),
        # vLLM, Ollama, LM Studio: 404 on both; the default, for good.
        ({}, (DEFAULT_CAPACITY, True), ["/props", "/slots"]),
        # llama-server --no-slots in router mode: errors, still an answer.
        (
            {"/props": _json(400, {"error": "model?"}), "/slots": _json(501, {"error": "off"})},
            (DEFAULT_CAPACITY, True),
            ["/props", "/slots"],
        ),
        # Not JSON at all.
        ({"/props": (200, b"<html>")}, (DEFAULT_CAPACITY, True), None),
    ],
)
async def test_detect_asks_the_engine(
    routes: dict[str, Answer], expected: tuple[int, bool], asked: list[str] | None
) -> None:
    async def handle(request: web.Request) -> web.StreamResponse:
        status, body = routes.get(request.path, _json(404, {"error": "not found"}))
        return web.Response(status=status, body=body)

    async with scripted_llm(handle) as llm:
        upstream = _upstream(llm.url)
        try:
            found = await capacity.detect(upstream.get_json)
        finally:
            await upstream.aclose()
    assert (found.value, found.detected) == expected
    if asked is not None:
        assert [seen.target for seen in llm.seen] == asked
        assert {seen.method for seen in llm.seen} == {"GET"}


async def _hang_up(request: web.Request) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.close()
    return web.Response()


@pytest.mark.parametrize("llm_is", ["down", "hanging up"])
async def test_detect_an_llm_that_is_down_stays_undetected(llm_is: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        if llm_is == "down":
            url = f"http://127.0.0.1:{free_port()}"
        else:
            url = (await stack.enter_async_context(scripted_llm(_hang_up))).url
        upstream = _upstream(url)
        try:
            found = await capacity.detect(upstream.get_json)
            with pytest.raises(UpstreamError) as info:
                await upstream.get_json("/props")
        finally:
            await upstream.aclose()
    assert (found.value, found.detected) == (DEFAULT_CAPACITY, False)
    assert not info.value.answered


async def test_get_json_sends_the_api_key_and_times_out() -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        if request.path == "/p/slow":
            await asyncio.sleep(5)
        return web.Response(body=b'{"data": [{"id": "m1"}, {"x": 1}]}')

    async with scripted_llm(slow) as llm:
        settings = ConnectorSettings(
            broker_url="http://b", broker_token="t", llm_url=llm.url + "/p/", llm_api_key="k"
        )
        upstream = Upstream(settings)
        try:
            assert await upstream.models() == ["m1"]
            with pytest.raises(UpstreamError) as info:
                await upstream.get_json("/slow", timeout=0.2)
        finally:
            await upstream.aclose()
    assert not info.value.answered
    assert llm.seen[0].target == "/p/v1/models"
    assert llm.seen[0].headers["authorization"] == "Bearer k"
