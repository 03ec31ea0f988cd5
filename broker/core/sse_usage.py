"""Token usage of a streamed answer, and the filter that hides the broker's usage request.

No I/O. ``with_include_usage`` asks the upstream for a final usage chunk
(``stream_options.include_usage``) when the client did not; the ``StreamUsage`` of that
request then removes exactly what the request added, so the client receives the stream
it asked for, byte for byte:

- the usage-only chunk (``"choices": []`` with a ``usage`` object), and
- ``"usage": null`` as the last member of a chunk (OpenAI documents that every chunk gets
  one with ``include_usage``). It is removed with its leading comma, which is exactly the
  serialisation without the member. A ``usage: null`` elsewhere in a chunk is left alone:
  it cannot be told apart from one the upstream always sends.

Events are found by their blank line whatever the chunking; only an event that mentions
``"usage"`` is looked at further, so the common chunk costs a substring search and one
regex. While filtering, an unfinished event is held until its blank line arrives (an SSE
client cannot use it earlier anyway); without filtering every byte passes at once.

Upstreams that ignore ``include_usage`` (llama-cpp-python's server, measured: no usage
chunk at all) are counted instead: one token per delivered event that carries a non-empty
content, text, reasoning or tool-call arguments delta (llama.cpp and vLLM stream one token
per event), marked ``estimated``; the prompt is then the estimate the limits reserve with
(``broker.core.demand``). docs/usage.md has the measurements.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

__all__ = [
    "USAGE_PATHS",
    "StreamUsage",
    "estimate_completion_tokens",
    "token_lines",
    "with_include_usage",
]

USAGE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
BYTES_PER_TOKEN = 4  # as broker.core.demand: about what OpenAI's tokenizers spend
MAX_EVENT = 1024 * 1024  # past this without a blank line the stream is not SSE: stop parsing

_INCLUDE_USAGE = b',"stream_options":{"include_usage":true}}'
_USAGE = b'"usage"'
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_USAGE_NULL = re.compile(rb'"usage"[ \t]*:[ \t]*null(?=[ \t]*\}[ \t]*\r?(?:\n|$))')
_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')


def token_lines(*keys: str) -> re.Pattern[bytes]:
    """Matches a line holding one of ``keys`` with a non-empty string value, to its end:
    one match per line however many such keys it has.

    An SSE event's JSON is one ``data:`` line (no server splits it) and an NDJSON object
    one line, so lines are events. One regex over a whole block counted 200 events in a
    third of the time a split and a per-event search took (61 against 205 µs; one event
    0.44 against 0.54 µs).
    """
    names = "|".join(re.escape(key) for key in keys).encode()
    return re.compile(rb'"(?:' + names + rb')"\s*:\s*"(?!")[^\r\n]*')


_DELTA_LINE = token_lines("content", "text", "reasoning_content", "reasoning", "arguments")
_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def with_include_usage(raw: bytes, body: Mapping[str, object]) -> bytes | None:
    """The request body asking for a usage chunk, or None when it needs no change.

    ``raw`` is the client's JSON object (UTF-8) and ``body`` its parsed form. No change when the
    request is not streamed, already asks for usage, or has a ``stream_options`` that is not
    an object (the upstream answers that as it would without the broker).
    """
    if body.get("stream") is not True:
        return None
    options = body.get("stream_options")
    if options is None and "stream_options" not in body:
        # Append the member textually: the client's bytes stay as they were otherwise.
        return raw.rstrip()[:-1] + _INCLUDE_USAGE
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return None
    changed = dict(body)
    changed["stream_options"] = {**options, "include_usage": True}
    return json.dumps(changed, ensure_ascii=False).encode()


def _text_bytes(value: object) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if isinstance(value, list):  # content parts
        return sum(_text_bytes(part) for part in value)
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        return len(value["text"].encode("utf-8"))
    return 0


def estimate_completion_tokens(raw: bytes) -> int:
    """UTF-8 bytes of a whole answer's message contents (or texts) / 4, rounded up (the
    prompt rule of ``broker.core.demand``, which gives the prompt estimate)."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return 0
    size = 0
    choices = doc.get("choices") if isinstance(doc, dict) else None
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if isinstance(message, dict):
            size += _text_bytes(message.get("content"))
        size += _text_bytes(choice.get("text"))
    return math.ceil(size / BYTES_PER_TOKEN)


def _count(block: bytes) -> int:
    """Events of ``block`` (whole events) that carry a token."""
    return len(_DELTA_LINE.findall(block))


def _strip_null_last(event: bytes) -> bytes:
    """``event`` without a ``"usage": null`` that is the last member of its object."""
    at = event.rfind(_USAGE)
    comma = event.rfind(b",", 0, at)
    found = _USAGE_NULL.match(event, at)
    if found is None or comma < 0 or event[comma + 1 : at].strip(b" \t"):
        return event
    return event[:comma] + event[found.end() :]


def _last(pattern: re.Pattern[bytes], data: bytes) -> int | None:
    found = pattern.findall(data)
    return int(found[-1]) if found else None


class StreamUsage:
    """Follows one SSE answer: its usage object, or the deltas delivered; strips if told."""

    __slots__ = ("_broken", "_counted", "_held", "_uncounted", "strip", "tokens_in", "tokens_out")

    def __init__(self, *, strip: bool) -> None:
        self.strip = strip  # the broker asked for usage: remove what that added
        self.tokens_in: int | None = None
        self.tokens_out: int | None = None
        self._counted = 0  # events with a non-empty content delta that went out ...
        # ... and the last common chunk, counted at the next call: its bytes go to the
        # client first (the first byte waited for a whole batch to be counted).
        self._uncounted = b""
        self._held = b""  # an event whose blank line has not arrived yet
        self._broken = False  # not SSE after all: pass everything, count nothing

    @property
    def deltas(self) -> int:
        """Events with a non-empty content delta that went out (one token each)."""
        if self._uncounted:
            self._counted += _count(self._uncounted)
            self._uncounted = b""
        return self._counted

    @property
    def exact(self) -> bool:
        """Whether the upstream reported the usage (else the counts are estimates)."""
        return self.tokens_out is not None

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send the client now for ``chunk`` of the upstream's answer."""
        if self._broken:
            return chunk
        if not self._held and chunk.endswith(b"\n\n") and _USAGE not in chunk:
            # The common chunk: whole events, no usage in them, nothing to hold or remove.
            # Counted at the next call (or when ``deltas`` is read), after it was sent.
            if self._uncounted:
                self._counted += _count(self._uncounted)
            self._uncounted = chunk
            return chunk
        data = self._held + chunk if self._held else chunk
        end = self._split_point(data)
        if end < 0:
            self._hold(data)
            return chunk if not self.strip else b""
        self._held = data[end:]
        if len(self._held) > MAX_EVENT:
            self._broken = True
        events = self._events(data[:end])
        if not self.strip:
            return chunk
        out = events + self._held if self._broken else events
        if self._broken:
            self._held = b""
        return out

    def finish(self) -> bytes:
        """At the clean end: an unterminated last event, processed and released."""
        held, self._held = self._held, b""
        if not held or self._broken:
            return held if self.strip else b""
        out = self._event(held)
        return out if self.strip else b""

    # -- events ---------------------------------------------------------------------------

    def _hold(self, data: bytes) -> None:
        if len(data) > MAX_EVENT:
            self._broken = True
            self._held = b""
        else:
            self._held = data

    @staticmethod
    def _split_point(data: bytes) -> int:
        """Where the last complete event of ``data`` ends (-1: none is complete)."""
        if b"\r" not in data:
            at = data.rfind(b"\n\n")
            return at + 2 if at >= 0 else -1
        last = -1
        for match in _BOUNDARY.finditer(data):
            last = match.end()
        return last

    def _events(self, block: bytes) -> bytes:
        """Process the complete events in ``block``; what remains of them to send."""
        if _USAGE not in block:
            # The common chunk: no usage anywhere, nothing to remove; count its deltas.
            self._counted += _count(block)
            return block
        crlf = b"\r" in block
        if not crlf and block.find(b"\n\n") == len(block) - 2:
            return self._event(block)  # one event: the usual chunk
        pieces = _BOUNDARY.split(block) if crlf else block.split(b"\n\n")
        seps = _BOUNDARY.findall(block) if crlf else None
        out: list[bytes] = []
        for i, piece in enumerate(pieces[:-1]):  # the last piece is empty: block ends an event
            sep = seps[i] if seps is not None else b"\n\n"
            out.append(self._event(piece + sep))
        return b"".join(out)

    def _event(self, event: bytes) -> bytes:
        if _USAGE not in event:
            self._counted += _count(event)
            return event
        if _USAGE_OBJECT.search(event, event.find(_USAGE)):
            prompt = _last(_PROMPT, event)
            completion = _last(_COMPLETION, event)
            if completion is not None or prompt is not None:
                self.tokens_in = prompt
                self.tokens_out = completion if completion is not None else 0
            if self.strip and _EMPTY_CHOICES.search(event):
                return b""
        elif self.strip:
            event = _strip_null_last(event)
        self._counted += _count(event)
        return event
