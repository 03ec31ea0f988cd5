"""Length-prefixed frames carried in connector uploads.

A frame is ``type (1 byte) | length (4 bytes, big endian) | payload``. The same frames
travel in one chunked POST (stream mode) or in a sequence of small POSTs (parts mode), so
no frame depends on HTTP chunk boundaries: proxies may re-chunk at will.

The multiplexed upload (one long-lived POST per connector, protocol revision 2) carries
the frames of many responses: each run of one response's frames travels inside a ``MUX``
frame whose payload is ``id length (1 byte) | request ID (ASCII) | that response's
frames``; a ``HEARTBEAT`` outside any ``MUX`` frame keeps the upload itself alive, and
``CLOSE`` ends it cleanly (every frame before it was sent: unfinished responses continue on
the connector's next multiplexed upload).

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
    MUX = 5  # multiplexed upload only: one response's frames, tagged with its request ID
    CLOSE = 6  # multiplexed upload only: the upload ends cleanly here


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
CLOSE_FRAME = encode(FrameType.CLOSE)
MAX_ID_BYTES = 255


def encode_mux(request_id: bytes, frames: bytes) -> bytes:
    """One response's frames (already encoded) tagged for the multiplexed upload."""
    return (
        _HEADER.pack(FrameType.MUX, 1 + len(request_id) + len(frames))
        + bytes((len(request_id),))
        + request_id
        + frames
    )


def split_mux(payload: bytes) -> tuple[str, bytes]:
    """The request ID and the inner frames of a MUX frame's payload."""
    if not payload or len(payload) < 1 + payload[0] or payload[0] == 0:
        raise FrameError("malformed MUX frame")
    end = 1 + payload[0]
    try:
        request_id = payload[1:end].decode("ascii")
    except UnicodeDecodeError as exc:
        raise FrameError("malformed MUX frame: the request ID is not ASCII") from exc
    return request_id, payload[end:]


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
