"""Reading an OpenAI chat completion stream as it arrives, for the chat's own replies.

Pure: bytes in (cut anywhere), what they said out. The broker's own answer is what is read
here (the relay's response to the chat's in-process request), so its shape is OpenAI's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

MAX_EVENT = 1024 * 1024  # one event larger than this is dropped, not buffered without end


@dataclass(slots=True)
class StreamReader:
    """Content deltas, the usage chunk and an in-band error of an SSE stream."""

    tokens_in: int | None = None
    tokens_out: int | None = None
    deltas: int = 0  # content chunks seen: the estimate when no usage chunk came
    error: str | None = None
    _buffer: str = ""
    _decoder_tail: bytes = field(default=b"")

    def feed(self, data: bytes) -> str:
        """The content text that ``data`` completes (possibly empty)."""
        data = self._decoder_tail + data
        text, self._decoder_tail = _decode(data)
        self._buffer += text.replace("\r\n", "\n")
        out: list[str] = []
        while (cut := self._buffer.find("\n\n")) >= 0:
            event, self._buffer = self._buffer[:cut], self._buffer[cut + 2 :]
            out.append(self._event(event))
        if len(self._buffer) > MAX_EVENT:
            self._buffer = ""
        return "".join(out)

    def _event(self, event: str) -> str:
        out = []
        for line in event.split("\n"):
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                continue
            try:
                chunk = json.loads(payload)
            except ValueError:
                continue
            if isinstance(chunk, dict):
                out.append(self._chunk(chunk))
        return "".join(out)

    def _chunk(self, chunk: dict[str, object]) -> str:
        error = chunk.get("error")
        if isinstance(error, dict):
            self.error = str(error.get("message") or "the model's answer failed")
            return ""
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.tokens_in = _int(usage.get("prompt_tokens"))
            self.tokens_out = _int(usage.get("completion_tokens"))
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return ""
        delta = choices[0].get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(content, str) and content:
            self.deltas += 1
            return content
        return ""


def error_message(body: bytes) -> str:
    """The message of an error answer (OpenAI's envelope), or a plain description."""
    try:
        data = json.loads(body)
        message = data["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return "the broker refused the request"
    return str(message)[:500]


def _decode(data: bytes) -> tuple[str, bytes]:
    """UTF-8 text of ``data`` and the bytes of a character cut at its end."""
    for cut in range(4):
        try:
            return data[: len(data) - cut].decode("utf-8"), data[len(data) - cut :]
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", "replace"), b""


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
