"""Length-prefixed frames carried in connector uploads.

A frame is ``type (1 byte) | length (4 bytes, big endian) | payload``. The same frames
travel in one chunked POST (stream mode) or in a sequence of small POSTs (parts mode), so
no frame depends on HTTP chunk boundaries: proxies may re-chunk at will.

The decoder is pure (no I/O): feed it bytes, get whole frames back.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from shared.errors import FrameError
from shared.protocol import ResponseEnd, ResponseHead

_HEADER = struct.Struct(">BI")
HEADER_SIZE = _HEADER.size
DEFAULT_MAX_FRAME = 16 * 1024 * 1024


class FrameType(IntEnum):
    HEAD = 1
    DATA = 2
    HEARTBEAT = 3
    END = 4


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    payload: bytes


def encode(frame_type: FrameType, payload: bytes = b"") -> bytes:
    return _HEADER.pack(frame_type, len(payload)) + payload


def encode_data(payload: bytes) -> bytes:
    return _HEADER.pack(FrameType.DATA, len(payload)) + payload


def encode_head(head: ResponseHead) -> bytes:
    return encode(FrameType.HEAD, head.model_dump_json().encode())


def encode_end(end: ResponseEnd) -> bytes:
    return encode(FrameType.END, end.model_dump_json().encode())


HEARTBEAT_FRAME = encode(FrameType.HEARTBEAT)


def decode_head(payload: bytes) -> ResponseHead:
    try:
        return ResponseHead.model_validate_json(payload)
    except ValueError as exc:
        raise FrameError("malformed HEAD frame") from exc


def decode_end(payload: bytes) -> ResponseEnd:
    try:
        return ResponseEnd.model_validate_json(payload)
    except ValueError as exc:
        raise FrameError("malformed END frame") from exc


class FrameDecoder:
    """Incremental decoder: ``feed`` returns every frame completed by the new bytes."""

    __slots__ = ("_buf", "_max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        pos = 0
        size = len(buf)
        while size - pos >= HEADER_SIZE:
            kind, length = _HEADER.unpack_from(buf, pos)
            if length > self._max_frame:
                raise FrameError(f"frame of {length} bytes exceeds the limit")
            end = pos + HEADER_SIZE + length
            if end > size:
                break
            try:
                frame_type = FrameType(kind)
            except ValueError as exc:
                raise FrameError(f"unknown frame type {kind}") from exc
            frames.append(Frame(frame_type, bytes(buf[pos + HEADER_SIZE : end])))
            pos = end
        if pos:
            del buf[:pos]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)
