"""The relay core's records. Only ``broker.core`` changes their fields; others read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from shared.protocol import RequestItem, UploadMode

SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Timings:
    lease: float = 15 * SECONDS
    session_ttl: float = 60 * SECONDS
    queue_wait: float = 60 * SECONDS
    queue_max: int = 256
    first_byte_timeout: float = 600 * SECONDS
    idle_timeout: float = 300 * SECONDS
    total_timeout: float = 3600 * SECONDS
    max_redispatch: int = 2
    # At most one "requests wait for connector slots" notice per model in this window.
    slots_notice_every: float = 60 * SECONDS
    max_sessions_per_identity: int = 32
    # A model no live session serves stays known (503) this long, then is forgotten (404).
    model_grace: float = 3600 * SECONDS


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a request ended without a response from its connector."""

    status: int
    code: str
    message: str


class Seen(Enum):
    """What an upload or the API handler saw of a request's response."""

    FRAME = "frame"  # a frame arrived: the request is alive (the idle deadline moves lazily)
    HEAD = "head"  # the response head arrived (the first-byte deadline no longer applies)
    DELIVERED = "delivered"  # upstream bytes reached the API user: no redispatch after one


class State(Enum):
    QUEUED = "queued"
    LEASED = "leased"  # handed out in a poll, not yet acknowledged by an upload
    ACTIVE = "active"  # the connector is uploading the response
    DONE = "done"


@dataclass(slots=True, eq=False)
class Pending:
    """A relayed request and its progress."""

    item: RequestItem
    created: float
    queue_deadline: float
    total_deadline: float
    seq: int
    user: str | None = None
    state: State = State.QUEUED
    session_id: str | None = None
    connector: str | None = None  # name of the session that served it last
    dispatches: int = 0
    leased_at: float = 0.0
    lease_deadline: float = 0.0
    first_byte_deadline: float = 0.0
    last_activity: float = 0.0
    head_seen: bool = False
    delivered: int = 0  # upstream bytes that reached the API user: no redispatch after one
    cancelled: bool = False

    @property
    def id(self) -> str:
        return self.item.request_id

    @property
    def model(self) -> str:
        return self.item.model

    @property
    def queue_wait(self) -> float | None:
        """Seconds from arrival to the (last) hand-out; None while never handed out."""
        return max(0.0, self.leased_at - self.created) if self.leased_at else None


@dataclass(frozen=True, slots=True)
class Registration:
    """What a connector registers a session with: its request, checked (broker/relay/app.py),
    with the identity its token maps to. Every relay state takes this one record."""

    owner: str  # the connector identity its token maps to
    name: str
    instance_id: str
    models: frozenset[str]  # the routes it takes: each model, and each pinned to its name
    capacity: int
    capacity_source: str
    version: str
    upload_mode: UploadMode
    upstream_api_key: str | None
    engine: str = ""  # what its LLM is ("ollama/0.6.2"; "" OpenAI-only): RegisterRequest

    def session(self, session_id: str, now: float) -> Session:
        """The session this registration opens, seen last at ``now``."""
        return Session(
            id=session_id,
            owner=self.owner,
            name=self.name,
            instance_id=self.instance_id,
            models=self.models,
            capacity=self.capacity,
            capacity_source=self.capacity_source,
            version=self.version,
            upload_mode=self.upload_mode,
            upstream_api_key=self.upstream_api_key,
            created=now,
            last_seen=now,
            engine=self.engine,
        )


@dataclass(slots=True, eq=False)
class Session:
    id: str
    owner: str  # the connector identity its token maps to
    name: str
    instance_id: str
    models: frozenset[str]
    capacity: int
    capacity_source: str
    version: str
    upload_mode: UploadMode
    upstream_api_key: str | None
    created: float
    last_seen: float
    polling: int = 0
    ttl_check: float | None = None  # when the one pending session-TTL deadline is due
    active: set[str] = field(default_factory=set)
    # Request IDs the next poll tells the connector to stop (ordered; O(1) membership).
    cancels: dict[str, None] = field(default_factory=dict)
    served: int = 0
    engine: str = ""  # what its LLM is ("ollama/0.6.2"; "" OpenAI-only): RegisterRequest

    @property
    def free(self) -> int:
        return max(0, self.capacity - len(self.active))
