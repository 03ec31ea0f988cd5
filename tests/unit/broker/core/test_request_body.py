"""The request body read once: shape limits before parsing, what the relay keeps."""

from __future__ import annotations

import json
import time

import pytest

from broker.core.demand import Ask
from broker.core.request_body import BodyRefused, JsonLimits, check_shape, inspect
from broker.malloc import return_large_buffers

LIMITS = JsonLimits(max_depth=8, max_elements=100)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello world!"}]}


def refused(raw: bytes, limits: JsonLimits = LIMITS) -> str:
    with pytest.raises(BodyRefused) as caught:
        inspect(raw, limits, ask_usage=False)
    return caught.value.code


def test_keeps_the_bytes_and_what_routing_needs() -> None:
    raw = json.dumps(CHAT | {"max_tokens": 7, "stream": True}).encode()
    body = inspect(raw, LIMITS, ask_usage=False)
    assert body.raw is raw and body.model == "m" and body.stream
    assert body.ask == Ask(prompt=3 + 4, max_tokens=7) and not body.usage_added


def test_asks_a_stream_for_usage_by_rewriting_the_bytes() -> None:
    raw = json.dumps(CHAT | {"stream": True}).encode()
    body = inspect(raw, LIMITS, ask_usage=True)
    assert body.usage_added
    assert json.loads(body.raw)["stream_options"] == {"include_usage": True}
    plain = json.dumps(CHAT).encode()
    assert inspect(plain, LIMITS, ask_usage=True).raw is plain


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", "invalid_json"),
        (b"[1]", "invalid_json"),
        (b'{"model": 1}', "missing_model"),
        (b'{"model": "m"', "invalid_json"),
        (b'{"model": "\xff"}', "invalid_json"),
        (b'{"model": "m", "x": ' + b"[" * 9 + b"]" * 9 + b"}", "json_too_deep"),
        (b'{"model": "m", "x": ' + b'{"a":' * 9 + b"1" + b"}" * 9 + b"}", "json_too_deep"),
        (b'{"model": "m", "x": [' + b"0," * 100 + b"0]}", "json_too_large"),
    ],
)
def test_refusals(raw: bytes, code: str) -> None:
    assert refused(raw) == code


def test_brackets_and_commas_inside_strings_do_not_count() -> None:
    text = '[[[[[[[[[[,,,,,,,,,,\\"' * 50
    raw = json.dumps({"model": "m", "x": text}).encode()
    assert inspect(raw, LIMITS, ask_usage=False).model == "m"


def test_depth_within_the_limit_with_many_brackets() -> None:
    raw = b'{"model": "m", "x": [' + b"[[]]," * 19 + b"[[]]]}"
    check_shape(raw, JsonLimits(max_depth=4, max_elements=1000))
    with pytest.raises(BodyRefused):
        check_shape(raw, JsonLimits(max_depth=2, max_elements=1000))


@pytest.mark.parametrize("piece", [b'\\"', b'"', b"\\", b'"\\'])
def test_hostile_strings_are_scanned_in_linear_time(piece: bytes) -> None:
    raw = b'{"model": "m", "x": "' + piece * 2_000_000
    started = time.perf_counter()
    with pytest.raises(BodyRefused):
        inspect(raw, JsonLimits(max_depth=128, max_elements=1_000_000), ask_usage=False)
    assert time.perf_counter() - started < 2.0


def test_malloc_tuning_applies_on_glibc() -> None:
    import platform

    assert return_large_buffers() is (platform.libc_ver()[0] == "glibc")
