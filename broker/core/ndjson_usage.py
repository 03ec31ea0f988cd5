"""Ollama's native API on the relay: NDJSON streams, their usage, its error shape.

No I/O. An Ollama stream is one JSON object per line (``application/x-ndjson``); the last
one has ``"done": true`` with ``prompt_eval_count`` (prompt tokens) and ``eval_count``
(generated tokens); a whole answer carries the same two fields, an ``/api/embed`` answer
``prompt_eval_count`` only (docs/clients.md has the wire format and its source). Every
byte passes on as it arrives; only complete lines are looked at, and only a line that
mentions ``eval_count`` is read for numbers. Without them, lines with a non-empty
``content`` / ``response`` / ``thinking`` string are counted, one token each (Ollama
streams one token per line), and the counts are marked estimated.

Its route shape (errors, the stream's end on a failure) is ``broker.core.ollama``.
"""

from __future__ import annotations

import re

from broker.core.held import HeldBlocks
from broker.core.sse_usage import token_lines

__all__ = ["NdjsonUsage", "ndjson_counts"]

MAX_LINE = 1 << 20  # a longer line is passed on, not parsed (nothing more is counted)
_COUNTS = b"eval_count"
_PROMPT = re.compile(rb'"prompt_eval_count"\s*:\s*(\d+)')
_EVAL = re.compile(rb'"eval_count"\s*:\s*(\d+)')
_DELTA_LINE = token_lines("content", "response", "thinking")


def ndjson_counts(tail: bytes) -> tuple[int | None, int | None]:
    """(prompt, generated) tokens the last lines of a whole answer report."""
    return _last(_PROMPT, tail), _last(_EVAL, tail)


def _last(pattern: re.Pattern[bytes], data: bytes) -> int | None:
    found = pattern.findall(data)
    return int(found[-1]) if found else None


def _line_end(data: bytes) -> int:
    return data.rfind(b"\n") + 1


class NdjsonUsage:
    """Follows one NDJSON answer: passes every byte at once, reads the final counts."""

    __slots__ = ("_held", "deltas", "tokens_in", "tokens_out")

    def __init__(self) -> None:
        self.tokens_in: int | None = None
        self.tokens_out: int | None = None
        self.deltas = 0
        self._held = HeldBlocks(_line_end, MAX_LINE)

    @property
    def exact(self) -> bool:
        return self.tokens_out is not None

    def feed(self, chunk: bytes) -> bytes:
        if lines := self._held.feed(chunk):
            self._lines(lines)
        return chunk

    def finish(self) -> bytes:
        if held := self._held.rest():
            self._lines(held)
        return b""

    def _lines(self, block: bytes) -> None:
        if _COUNTS in block:
            prompt, generated = _last(_PROMPT, block), _last(_EVAL, block)
            if prompt is not None or generated is not None:
                self.tokens_in = prompt
                self.tokens_out = generated if generated is not None else 0
        self.deltas += len(_DELTA_LINE.findall(block))
