"""The relay protocol (v1) between connector and broker, as pydantic models.

Every relay call carries ``Authorization: Bearer <connector token>``. Paths live under
``/relay/v1/``; see ``docs/protocol.md`` for the full exchange.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from shared.model_names import check_model_names

PROTOCOL_VERSION = 1
RELAY_PREFIX = f"/relay/v{PROTOCOL_VERSION}"
# Additions within v1 that both sides negotiate at registration, so an older broker or
# connector keeps working with a newer one (unknown fields are ignored on both sides):
#   1: per-request uploads (stream, parts)
#   2: the multiplexed upload (``mux_upload`` in the registration and its answer)
PROTOCOL_REVISION = 2

# Headers the broker puts on relay responses and the API side.
REQUEST_ID_HEADER = "x-request-id"
OVERHEAD_HEADER = "x-remotellm-overhead-ms"
# Always sent to the local LLM; x-request-id too when the ID is a UUID (the broker's are).
UPSTREAM_REQUEST_ID_HEADER = "x-remotellm-request-id"


ENGINE_PATTERN = r"^([a-z0-9_-]{1,20}(/[A-Za-z0-9._+-]{0,40})?)?$"


class UploadMode(StrEnum):
    """How the connector uploads responses.

    On the wire a registration says ``stream`` or ``parts`` (what every broker of protocol
    v1 accepts) and asks for the multiplexed upload with ``mux_upload``; ``mux`` and
    ``auto`` are the connector's settings (and ``mux`` what the broker shows for a session
    that was granted it).
    """

    STREAM = "stream"  # one chunked POST per response
    PARTS = "parts"  # small sequenced POSTs per response
    MUX = "mux"  # one long-lived chunked POST per connector carries every response
    AUTO = "auto"  # probe the path: mux (or stream) where it streams bodies, else parts


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# A list of model names as a connector sends it: each name follows the one rule
# (shared/model_names.py), duplicates dropped; a bad name refuses the whole message.
ModelNames = Annotated[list[str], AfterValidator(check_model_names)]


class RegisterRequest(_Model):
    name: str = Field(min_length=1, max_length=200)
    models: ModelNames = Field(default_factory=list, max_length=1000)
    capacity: int = Field(ge=1, le=100_000)
    version: str = "unknown"
    protocol: int = PROTOCOL_VERSION
    upload_mode: UploadMode = UploadMode.STREAM
    # Random per connector process: tells a restart (same name, new process, old session
    # idle) from two live processes registering one name (a clash worth a warning).
    instance_id: str = Field(default="", max_length=64)
    # Where the capacity came from ("--capacity", "llama.cpp /props total_slots", "default").
    capacity_source: str = Field(default="configured", max_length=200)
    revision: int = 1  # PROTOCOL_REVISION of the connector (absent: an older one)
    # The connector would send every response on one multiplexed upload (revision 2).
    mux_upload: bool = False
    # What the local LLM is, as the connector detected it at start: "<kind>/<version>"
    # ("ollama/0.6.2"), or "" when it is only known to speak the OpenAI API. The broker
    # relays Ollama's native API (/api/*) only to sessions of kind ollama.
    engine: str = Field(default="", max_length=80, pattern=ENGINE_PATTERN)


class RefusedModel(_Model):
    """A model the registration named that the session may not serve, and why."""

    model: str
    reason: str


class Replaced(StrEnum):
    """What a registration did to an older session of the same identity and name."""

    NONE = "none"
    RESTART = "restart"  # the old session was idle: its process is gone
    LIVE = "live"  # the old session was still polling: two processes share one name


class RegisterResponse(_Model):
    session_id: str
    poll_wait_s: float
    lease_s: float
    session_ttl_s: float
    heartbeat_s: float
    upload_mode: UploadMode
    max_part_bytes: int
    protocol: int = PROTOCOL_VERSION
    replaced: Replaced = Replaced.NONE
    revision: int = 1  # PROTOCOL_REVISION of the broker (absent: an older one)
    # The broker takes the multiplexed upload from this session: POST .../mux.
    mux_upload: bool = False
    # Models this identity may not serve (docs/security.md): the session serves the rest.
    refused: list[RefusedModel] = Field(default_factory=list)


# Error codes of the relay's 404 for a session the broker no longer has.
SESSION_UNKNOWN = "session_unknown"  # expired or deregistered: register again
SESSION_REPLACED = "session_replaced"  # another process registered the same name


class ModelsUpdate(_Model):
    models: ModelNames = Field(max_length=1000)


class ModelsUpdated(_Model):
    """The answer to a models update (an older broker answers 204 with no body)."""

    models: list[str] = Field(default_factory=list)
    refused: list[RefusedModel] = Field(default_factory=list)


class RequestItem(_Model):
    """A request handed to a connector: forward ``body`` to the local LLM at ``path``."""

    type: Literal["request"] = "request"
    request_id: str
    model: str
    method: str = "POST"
    path: str
    # The JSON body as the API user sent it (UTF-8); a JSON string on the wire. Bytes, so a
    # queued request holds it once, at one byte per byte.
    body: bytes
    headers: dict[str, str] = Field(default_factory=dict)
    upstream_api_key: str | None = None
    stream: bool = False
    timeout_s: float = 600.0
    attempt: int = 1


class CancelItem(_Model):
    """Stop working on ``request_id``: its API user went away or it was given to another."""

    type: Literal["cancel"] = "cancel"
    request_id: str


WorkItem = Annotated[RequestItem | CancelItem, Field(discriminator="type")]


class PollResponse(_Model):
    items: list[WorkItem] = Field(default_factory=list)


class UploadResult(_Model):
    """The broker's answer to an upload (stream mode) or a part (parts mode)."""

    status: Literal["ok", "cancelled", "duplicate"] = "ok"


class ProbeResult(_Model):
    """Whether a chunked body sent with gaps reached the broker incrementally."""

    incremental: bool
    chunks: int
    spread_ms: float


class ResponseHead(_Model):
    """First frame of an upload: the upstream's status and headers."""

    status: int
    headers: list[tuple[str, str]] = Field(default_factory=list)
    upstream_ms: float = 0.0


class ResponseEnd(_Model):
    """Last frame of an upload: a clean end, or an error with a reason."""

    ok: bool = True
    error: str | None = None
    error_type: str | None = None
    status: int | None = None
    upstream_ms: float = 0.0


# -- enrollment (docs/enrollment.md) ------------------------------------------------------

ENROLL_SECRET_MIN = 32  # characters of the connector's random enrollment secret


class EnrollRequest(_Model):
    """A connector with no token asks to join (and asks again for the verdict)."""

    name: str = Field(min_length=1, max_length=200)
    models: ModelNames = Field(default_factory=list, max_length=200)
    version: str = Field(default="unknown", max_length=64)
    # Random, kept by the connector until it has its token: it names this request, so a
    # connector asking again finds its own entry, and only it can collect the token.
    secret: str = Field(min_length=ENROLL_SECRET_MIN, max_length=128)


class EnrollStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    REVOKED = "revoked"


class EnrollResponse(_Model):
    """The verdict so far. ``token`` is set once: the answer that delivers it."""

    status: EnrollStatus
    enrollment_id: str
    message: str
    retry_after_s: float = 3.0
    token: str | None = None
