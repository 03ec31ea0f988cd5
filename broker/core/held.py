"""A stream's bytes cut into whole blocks (events, lines) for the usage readers.

No I/O. The readers pass every byte on as it arrives and only look at complete blocks: the
start of a block whose end has not arrived yet is held here until it does. A block longer
than the limit breaks the reader for the rest of the stream (nothing more is parsed; the
bytes still pass), so a hostile upstream cannot make the broker buffer without bound.
Used by Anthropic's and Ollama's readers; OpenAI's (``sse_usage.StreamUsage``) keeps its
own, since it also rewrites events and has a fast path for the common chunk.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["HeldBlocks"]


class HeldBlocks:
    """``feed`` returns the complete blocks a chunk finishes; ``rest`` what was left."""

    __slots__ = ("_held", "_limit", "_split", "broken")

    def __init__(self, split: Callable[[bytes], int], limit: int) -> None:
        self._split = split  # where the last complete block of some bytes ends (<= 0: none)
        self._limit = limit
        self._held = b""
        self.broken = False

    def feed(self, chunk: bytes) -> bytes:
        if self.broken:
            return b""
        data = self._held + chunk if self._held else chunk
        end = max(self._split(data), 0)
        self._held = data[end:]
        if len(self._held) > self._limit:
            self.broken, self._held = True, b""
        return data[:end]

    def rest(self) -> bytes:
        """The unfinished block at the stream's end (empty once broken)."""
        held, self._held = self._held, b""
        return b"" if self.broken else held
