"""The usage filter of streamed answers (broker.core.sse_usage): table-driven, each stream
cut at every byte and at random points, the output compared byte for byte."""

from __future__ import annotations

import json
import random

import pytest

from broker.core.sse_usage import (
    StreamUsage,
    estimate_completion_tokens,
    with_include_usage,
)

DONE = b"data: [DONE]\n\n"
LLAMA_SERVER_LAST = (
    b'data: {"choices":[{"delta":{}}],"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\n'
)


def compact(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def spaced(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def chunk(text: str, *, usage_null: bool, dump=compact, finish: str | None = None) -> dict:  # type: ignore[no-untyped-def]
    delta = {"content": text} if text else {}
    obj: dict[str, object] = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage_null:
        obj["usage"] = None
    return obj


def usage_chunk(prompt: int, completion: int) -> dict:  # type: ignore[type-arg]
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def sse(objs: list[dict], dump=compact, sep: bytes = b"\n\n") -> bytes:  # type: ignore[no-untyped-def,type-arg]
    return b"".join(b"data: " + dump(o) + sep for o in objs) + DONE.replace(b"\n\n", sep)


TEXTS = ["Hel", "lo", " wörld 🙂", ""]  # the last: the finish chunk, no content


def stream(*, usage_null: bool, with_usage: bool, dump=compact, sep: bytes = b"\n\n") -> bytes:  # type: ignore[no-untyped-def]
    objs = [chunk(t, usage_null=usage_null, finish="stop" if not t else None) for t in TEXTS]
    if with_usage:
        objs.append(usage_chunk(11, 3))
    return sse(objs, dump, sep)


def run(filt: StreamUsage, data: bytes, cuts: list[int]) -> bytes:
    out = []
    start = 0
    for cut in [*cuts, len(data)]:
        out.append(filt.feed(data[start:cut]))
        start = cut
    out.append(filt.finish())
    return b"".join(out)


def every_split(data: bytes) -> list[list[int]]:
    rng = random.Random(len(data))
    splits = [[i] for i in range(1, len(data))]
    splits += [sorted(rng.sample(range(1, len(data)), 7)) for _ in range(30)]
    splits.append(list(range(1, len(data))))  # one byte at a time
    return splits


CASES = [
    # (name, what the upstream sends with include_usage, what it sends without it)
    pytest.param(
        stream(usage_null=False, with_usage=True),
        stream(usage_null=False, with_usage=False),
        (11, 3),
        id="final-usage-chunk",
    ),
    pytest.param(
        stream(usage_null=True, with_usage=True),
        stream(usage_null=False, with_usage=False),
        (11, 3),
        id="openai-usage-null-in-every-chunk",
    ),
    pytest.param(
        stream(usage_null=True, with_usage=True, dump=spaced),
        stream(usage_null=False, with_usage=False, dump=spaced),
        (11, 3),
        id="spaced-json",
    ),
    pytest.param(
        stream(usage_null=True, with_usage=True, sep=b"\r\n\r\n"),
        stream(usage_null=False, with_usage=False, sep=b"\r\n\r\n"),
        (11, 3),
        id="crlf-events",
    ),
    pytest.param(
        stream(usage_null=False, with_usage=False),
        stream(usage_null=False, with_usage=False),
        None,
        id="ignores-include-usage",
    ),
]


@pytest.mark.parametrize(("upstream", "client", "tokens"), CASES)
def test_strip_gives_the_client_the_stream_it_asked_for(
    upstream: bytes, client: bytes, tokens: tuple[int, int] | None
) -> None:
    for cuts in every_split(upstream):
        filt = StreamUsage(strip=True)
        assert run(filt, upstream, cuts) == client, cuts
        if tokens is None:
            assert not filt.exact
            assert (filt.tokens_in, filt.tokens_out) == (None, None)
        else:
            assert filt.exact
            assert (filt.tokens_in, filt.tokens_out) == tokens
        assert filt.deltas == 3  # three chunks carry content, the finish chunk none


@pytest.mark.parametrize(("upstream", "client", "tokens"), CASES)
def test_without_strip_every_byte_passes_at_once(
    upstream: bytes, client: bytes, tokens: tuple[int, int] | None
) -> None:
    """The client asked for usage itself: its bytes pass as they come, usage is read."""
    for cuts in every_split(upstream)[::7]:
        filt = StreamUsage(strip=False)
        start = 0
        for cut in [*cuts, len(upstream)]:
            piece = upstream[start:cut]
            assert filt.feed(piece) == piece
            start = cut
        assert filt.finish() == b""
        assert (filt.tokens_in, filt.tokens_out) == (tokens or (None, None))
        assert filt.deltas == 3


@pytest.mark.parametrize(
    ("event", "kept"),
    [
        # usage: null not as the last member: it cannot be told from one always sent
        (b'data: {"usage":null,"choices":[]}\n\n', b'data: {"usage":null,"choices":[]}\n\n'),
        (b'data: {"a":{"usage":null},"b":1}\n\n', b'data: {"a":{"usage":null},"b":1}\n\n'),
        # nested at the end of an inner object: the inner brace is not the line's last
        (b'data: {"a":{"x":1,"usage":null}}\n\n', b'data: {"a":{"x":1,"usage":null}}\n\n'),
        # inside a string the quotes are escaped: never matched
        (
            b'data: {"choices":[{"delta":{"content":"x,\\"usage\\": null}"}}]}\n\n',
            b'data: {"choices":[{"delta":{"content":"x,\\"usage\\": null}"}}]}\n\n',
        ),
        # the member last, whatever the spacing
        (b'data: {"a": 1, "usage" : null}\n\n', b'data: {"a": 1}\n\n'),
        (b'data: {"a": 1,\t"usage":null }\r\n\r\n', b'data: {"a": 1 }\r\n\r\n'),
        # comments and [DONE] pass
        (b": keepalive\n\n", b": keepalive\n\n"),
        (DONE, DONE),
        # a usage object with choices is not the extra chunk: kept (llama.cpp's own server)
        (LLAMA_SERVER_LAST, LLAMA_SERVER_LAST),
    ],
)
def test_strip_removes_only_what_injection_adds(event: bytes, kept: bytes) -> None:
    filt = StreamUsage(strip=True)
    assert filt.feed(event) + filt.finish() == kept


def test_an_unterminated_last_event_is_released_at_the_end() -> None:
    filt = StreamUsage(strip=True)
    assert filt.feed(b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}') == b""
    assert filt.finish() == b'data: {"choices":[{"delta":{"content":"a"}}]}'
    assert filt.deltas == 1


def test_what_is_not_sse_passes_after_a_bound() -> None:
    filt = StreamUsage(strip=True)
    blob = b"x" * (1024 * 1024 + 10)
    assert filt.feed(blob) == b""  # over the bound: filtering gives up...
    assert filt.feed(b"more\n\n") == b"more\n\n"  # ...and passes everything from then on
    assert filt.deltas == 0


def test_deltas_count_text_reasoning_and_tool_arguments() -> None:
    events = [
        {"choices": [{"delta": {"role": "assistant"}}]},
        {"choices": [{"delta": {"content": ""}}]},
        {"choices": [{"delta": {"content": None}}]},
        {"choices": [{"delta": {"reasoning_content": "hmm"}}]},
        {"choices": [{"delta": {"tool_calls": [{"function": {"arguments": "{\\"}}]}}]},
        {"choices": [{"text": "x", "index": 0}]},  # /v1/completions
        {"choices": [{"delta": {"content": "y"}}]},
    ]
    filt = StreamUsage(strip=False)
    filt.feed(sse(events))  # all in one chunk
    assert filt.deltas == 4
    one_by_one = StreamUsage(strip=False)
    for event in events:
        one_by_one.feed(b"data: " + compact(event) + b"\n\n")
    assert one_by_one.deltas == 4


def test_an_event_with_two_token_keys_counts_once() -> None:
    both = {"choices": [{"delta": {"reasoning_content": "a", "content": "b"}}]}
    filt = StreamUsage(strip=False)
    filt.feed(sse([both, both]) + b"data: " + compact(both) + b"\r\n\r\n")
    assert filt.deltas == 3


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # no stream_options: appended as text, the client's bytes otherwise unchanged
        (
            '{"model": "m", "stream": true}\n',
            '{"model": "m", "stream": true,"stream_options":{"include_usage":true}}',
        ),
        # other stream options are kept
        (
            '{"model":"m","stream":true,"stream_options":{"include_usage":false,"x":1}}',
            '{"model": "m", "stream": true, "stream_options": {"include_usage": true, "x": 1}}',
        ),
        ('{"model":"m","stream":true,"stream_options":{"include_usage":true}}', None),
        ('{"model":"m","stream":false}', None),
        ('{"model":"m"}', None),
        ('{"model":"m","stream":true,"stream_options":null}', None),
    ],
)
def test_with_include_usage(body: str, expected: str | None) -> None:
    changed = with_include_usage(body.encode(), json.loads(body))
    assert changed == (None if expected is None else expected.encode())
    if changed is not None:
        assert json.loads(changed)["stream_options"]["include_usage"] is True


def test_completion_estimate() -> None:
    raw = compact({"choices": [{"message": {"content": "12345"}}, {"text": "123"}]})
    assert estimate_completion_tokens(raw) == 2  # 8 bytes / 4
    parts = compact({"choices": [{"message": {"content": [{"type": "text", "text": "é" * 5}]}}]})
    assert estimate_completion_tokens(parts) == 3  # 10 UTF-8 bytes / 4, rounded up
    assert estimate_completion_tokens(b"not json") == 0
