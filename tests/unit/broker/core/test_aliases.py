"""Aliases without I/O: routes, which target serves now, the body's rewritten model."""

from __future__ import annotations

import json

import pytest

from broker.core.aliases import (
    Alias,
    Target,
    fold_routes,
    public_model,
    public_models,
    serves,
    session_routes,
)
from broker.core.request_body import JsonLimits, inspect, with_model

CHAT = Alias("chat", (Target("big", "gpu-box"), Target("big"), Target("small")))


def test_a_pinned_target_routes_to_its_connector_only() -> None:
    assert Target("big").route == "big"
    assert Target("big", "gpu-box").route == "big#gpu-box"
    routes = session_routes(["big", "small"], "gpu-box")
    assert routes == ["big", "small", "big#gpu-box", "small#gpu-box"]
    assert public_models(routes) == {"big", "small"}
    assert public_model("big#gpu-box") == "big"
    # A connector name may hold '#': the model ends at the first one.
    assert public_model(Target("m", "a#b").route) == "m"
    assert fold_routes({"big": 1, "big#gpu-box": 2, "small": 3}) == {"big": 3, "small": 3}
    assert serves("big#gpu-box", {"big"}, "gpu-box") and serves("big", {"big"}, "laptop")
    assert not serves("big#gpu-box", {"big"}, "laptop")
    assert not serves("small#gpu-box", {"big"}, "gpu-box")


@pytest.mark.parametrize(
    ("live", "serving"),
    [
        ({"big": ["gpu-box", "laptop"], "small": ["laptop"]}, Target("big", "gpu-box")),
        ({"big": ["laptop"], "small": ["laptop"]}, Target("big")),  # the pinned box is away
        ({"small": ["laptop"]}, Target("small")),
        ({"other": ["laptop"]}, None),
        ({}, None),
    ],
)
def test_the_first_live_target_serves(live: dict[str, list[str]], serving: Target | None) -> None:
    assert CHAT.serving_now(live) == serving


LIMITS = JsonLimits(max_depth=32, max_elements=10_000)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"chat","messages":[{"role":"user","content":"hi"}]}',
        b'{ "messages" : [ {"model": "inner", "content": "\\"model\\": x"} ] ,'
        b'\n "model" : "chat" }',
        b'{"stream": true, "model": "ch\\u0061t", "metadata": {"model": "keep"}}',
        '{"model": "chat", "messages": [{"content": "héllo \\u00e9"}]}'.encode(),
    ],
)
def test_only_the_top_level_model_changes(raw: bytes) -> None:
    out = with_model(raw, "llama3:8b")
    before, after = json.loads(raw), json.loads(out)
    assert after == {**before, "model": "llama3:8b"}
    # Byte-identical but for the one value.
    at = out.index(b'"llama3:8b"')
    rest = out[at + len(b'"llama3:8b"') :]
    assert raw.startswith(out[:at]) and raw.endswith(rest)
    assert json.loads(raw[at : len(raw) - len(rest)]) == "chat"
    assert inspect(out, LIMITS, ask_usage=False).model == "llama3:8b"


def test_a_model_named_twice_is_re_serialized_and_the_last_wins() -> None:
    raw = b'{"model": 3, "x": 1, "model": "chat"}'
    out = with_model(raw, "small")
    assert json.loads(out) == {"model": "small", "x": 1}
