"""What the health server and ``/metrics`` report, derived from what the connector did.

The parts of the connector never set a field: they say what happened (``SessionEnded``,
``RequestServed``...) to the ``StatusBoard``, and ``Status.apply`` (pure: no clock, no I/O;
times come in the events) folds each event into a new ``Status``. Readers take
``StatusBoard.current``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import assert_never

from shared.protocol import UploadMode


@dataclass(frozen=True)
class Registered:
    """A session began; ``upload_mode`` is what serves it (``mux`` when granted)."""

    session_id: str
    upload_mode: str
    poll_mode: str
    models: tuple[str, ...]


@dataclass(frozen=True)
class SessionEnded:
    """The session was lost, replaced or given up to register again."""


@dataclass(frozen=True)
class BrokerFailed:
    error: str


@dataclass(frozen=True)
class WorkReceived:
    """A streaming poll delivered items (the poll itself goes on)."""

    at: float


@dataclass(frozen=True)
class PollAnswered:
    """A poll ended with the broker's answer."""

    at: float


@dataclass(frozen=True)
class CapacityChanged:
    value: int
    source: str


@dataclass(frozen=True)
class ModelsChanged:
    """The broker accepted a new list of served models."""

    models: tuple[str, ...]


@dataclass(frozen=True)
class LlmChecked:
    ok: bool
    error: str | None
    at: float


@dataclass(frozen=True)
class MuxGaveUp:
    """The multiplexed upload stopped: requests go out one POST each."""


@dataclass(frozen=True)
class RequestServed:
    pass


@dataclass(frozen=True)
class RequestFailed:
    pass


Event = (
    Registered
    | SessionEnded
    | BrokerFailed
    | WorkReceived
    | PollAnswered
    | CapacityChanged
    | ModelsChanged
    | LlmChecked
    | MuxGaveUp
    | RequestServed
    | RequestFailed
)
Emit = Callable[[Event], None]


@dataclass(frozen=True)
class Status:
    """What the health server reports (times are ``time.monotonic`` seconds, 0: never)."""

    session_id: str | None = None
    capacity: int = 0
    capacity_source: str = ""
    upload_mode: str | None = None
    poll_mode: str | None = None
    models: list[str] = field(default_factory=list)
    last_poll_ok: float = 0.0
    broker_error: str | None = None
    llm_ok: bool = False
    llm_error: str | None = None
    llm_checked: float = 0.0
    served: int = 0
    failed: int = 0
    reconnects: int = 0

    def apply(self, event: Event) -> Status:
        """The status after ``event``."""
        match event:
            case Registered():
                return replace(
                    self,
                    session_id=event.session_id,
                    upload_mode=event.upload_mode,
                    poll_mode=event.poll_mode,
                    models=list(event.models),
                    broker_error=None,
                )
            case SessionEnded():
                return replace(self, session_id=None, reconnects=self.reconnects + 1)
            case BrokerFailed():
                return replace(self, broker_error=event.error)
            case WorkReceived():
                return replace(self, last_poll_ok=event.at)
            case PollAnswered():
                return replace(self, last_poll_ok=event.at, broker_error=None)
            case CapacityChanged():
                return replace(self, capacity=event.value, capacity_source=event.source)
            case ModelsChanged():
                return replace(self, models=list(event.models))
            case LlmChecked():
                return replace(self, llm_ok=event.ok, llm_error=event.error, llm_checked=event.at)
            case MuxGaveUp():
                return replace(self, upload_mode=UploadMode.STREAM.value)
            case RequestServed():
                return replace(self, served=self.served + 1)
            case RequestFailed():
                return replace(self, failed=self.failed + 1)
            case _:
                assert_never(event)


class StatusBoard:
    """Holds the current ``Status``; ``emit`` is what the connector's parts are given."""

    def __init__(self) -> None:
        self.current = Status()

    def emit(self, event: Event) -> None:
        self.current = self.current.apply(event)
