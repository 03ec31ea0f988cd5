"""Ollama's NDJSON on the relay: bytes pass at once, counts from the final line."""

from __future__ import annotations

import json

from broker.core.errors import BrokerError
from broker.core.ndjson_usage import NdjsonUsage
from broker.core.ollama import OLLAMA
from broker.core.route_shapes import shape_for

LINES = [
    b'{"model":"m","message":{"role":"assistant","content":"Hel"},"done":false}\n',
    b'{"model":"m","message":{"role":"assistant","content":"lo"},"done":false}\n',
    b'{"model":"m","message":{"role":"assistant","content":""},"done":true,'
    b'"done_reason":"stop","prompt_eval_count":26,"eval_count":2}\n',
]


def test_every_byte_passes_at_once_whatever_the_chunking() -> None:
    whole = b"".join(LINES)
    for size in (1, 3, 17, len(whole)):
        usage = NdjsonUsage()
        out = b"".join(usage.feed(whole[i : i + size]) for i in range(0, len(whole), size))
        assert out + usage.finish() == whole
        assert (usage.tokens_in, usage.tokens_out, usage.exact) == (26, 2, True)
        assert usage.deltas == 2


def test_without_counts_the_token_lines_are_counted() -> None:
    usage = NdjsonUsage()
    usage.feed(b"".join(LINES[:2]) + b'{"response":"x","done":false}')  # no newline yet
    usage.finish()
    assert (usage.exact, usage.deltas) == (False, 3)


def test_a_huge_line_is_passed_on_and_not_parsed() -> None:
    usage = NdjsonUsage()
    blob = b'{"response":"' + b"x" * (2 << 20)
    assert usage.feed(blob) == blob
    assert usage.feed(b'","eval_count":5}\n') == b'","eval_count":5}\n'
    assert not usage.exact


def test_whole_answers_and_errors() -> None:
    chat = json.dumps({"message": {"content": "abcdefgh"}, "prompt_eval_count": 4}).encode()
    assert OLLAMA.whole_usage(chat) == (4, None)
    assert OLLAMA.whole_usage(LINES[2]) == (26, 2)
    assert OLLAMA.estimate_completion(chat) == 2
    assert OLLAMA.estimate_completion(b'{"response": "abcd"}') == 1
    assert json.loads(OLLAMA.error_body(BrokerError(503, "busy", "x"))) == {"error": "busy"}
    assert OLLAMA.stream_error(BrokerError(502, "gone", "x"), b'{"a":') == b'\n{"error": "gone"}\n'
    assert OLLAMA.stream_error(BrokerError(502, "gone", "x"), b"}\n") == b'{"error": "gone"}\n'
    openai_style = b'{"error": {"message": "bad model", "type": "x"}}'
    assert json.loads(OLLAMA.upstream_error(openai_style, 400)) == {"error": "bad model"}
    assert json.loads(OLLAMA.upstream_error(b'{"error": "nope"}', 404)) == {"error": "nope"}
    assert not OLLAMA.commits
    assert shape_for("/api/chat") is OLLAMA and shape_for("/apix") is not OLLAMA
