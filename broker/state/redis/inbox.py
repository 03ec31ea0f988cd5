"""Response frames between brokers: each broker reads one inbox stream of its own.

The broker carrying a connector's upload appends the frames of every ``flush`` as one
stream entry to the inbox of the request's home broker (the one holding the API user):
``r`` names the request, then ``<n><kind>`` fields in order (``h`` head, ``d`` data, ``e``
end, ``f`` failure, ``t`` heartbeat, ``m`` who serves it, ``q`` a new queue deadline).
One entry per flush keeps it one ``XADD`` per upload chunk, and one inbox per broker means
one blocking ``XREAD`` per broker instead of one per request (docs/scale-out.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from broker.core import Failure
from shared.logging import get_logger
from shared.protocol import ResponseEnd, ResponseHead

log = get_logger("broker.state.redis")

INBOX_MAXLEN = 100_000

HEAD, DATA, END, FAIL, TOUCH, META, REQUEUED = b"h", b"d", b"e", b"f", b"t", b"m", b"q"


@dataclass(frozen=True, slots=True)
class Meta:
    """Who serves the request: shown in the home broker's log line and usage record."""

    connector: str
    attempt: int
    leased_at: float  # wall clock

    def encode(self) -> bytes:
        return json.dumps({"c": self.connector, "a": self.attempt, "l": self.leased_at}).encode()

    @staticmethod
    def decode(raw: bytes) -> Meta:
        d = json.loads(raw)
        return Meta(str(d["c"]), int(d["a"]), float(d["l"]))


def encode_failure(failure: Failure) -> bytes:
    return json.dumps(
        {"status": failure.status, "code": failure.code, "message": failure.message}
    ).encode()


def decode_failure(raw: bytes) -> Failure:
    d = json.loads(raw)
    return Failure(int(d["status"]), str(d["code"]), str(d["message"]))


def entry_frames(fields: dict[bytes, bytes]) -> tuple[str, list[tuple[bytes, bytes]]]:
    """An inbox entry's request ID and its frames, in order."""
    rid = fields[b"r"].decode()
    # The fields come back in the order they were added.
    return rid, [(key[-1:], value) for key, value in fields.items() if key != b"r"]


class RemoteSink:
    """A FrameSink whose API handler is on another broker: frames go to its inbox."""

    __slots__ = ("_buffer", "_inbox", "_redis", "_rid")

    def __init__(self, redis: Redis, inbox: str, rid: str, meta: Meta) -> None:
        self._redis = redis
        self._inbox = inbox
        self._rid = rid
        self._buffer: list[tuple[bytes, bytes]] = [(META, meta.encode())]

    def head(self, head: ResponseHead) -> None:
        self._buffer.append((HEAD, head.model_dump_json().encode()))

    def data(self, chunk: bytes) -> None:
        self._buffer.append((DATA, chunk))

    def end(self, end: ResponseEnd) -> None:
        self._buffer.append((END, end.model_dump_json().encode()))

    def fail(self, failure: Failure) -> None:
        self._buffer.append((FAIL, encode_failure(failure)))

    def touch(self) -> None:
        if not self._buffer:
            self._buffer.append((TOUCH, b""))

    @property
    def buffered(self) -> int:
        return 0  # handed to Redis at every flush; the home broker's channel holds it

    async def flush(self) -> None:
        if not self._buffer:
            return
        fields: dict[bytes, bytes] = {b"r": self._rid.encode()}
        for n, (kind, value) in enumerate(self._buffer):
            fields[str(n).encode() + kind] = value
        self._buffer = []
        try:
            await self._redis.xadd(
                self._inbox,
                fields,  # type: ignore[arg-type]
                maxlen=INBOX_MAXLEN,
                approximate=True,
            )
        except RedisError as exc:
            # The home broker fails the request itself when Redis goes (it reads the inbox).
            log.warning("upload_frames_lost", error=str(exc))
