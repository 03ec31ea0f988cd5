"""Connector enrollment: connectors that ask to join, and the operator's verdicts.

A connector with no token asks ``POST /relay/v1/enroll`` with its name, models and a random
secret it keeps; the broker keeps one *pending* entry per secret, matched by that secret
only: whoever asks with the same name (and, behind a proxy, the same apparent address)
makes an entry of its own and never takes over another's, so only the connector that
asked can collect the token. The approval page shows each pending entry's fingerprint
(``shared.fingerprint``), which the connector prints while it waits, so the operator
approves the right one. The operator approves, rejects, or later revokes it on
``/portal/admin``. On approval the connector's next ask gets a fresh token, exactly once:
only its hash is kept, and the secret is forgotten with the delivery.

Entries live in ``<data-dir>/enrolled_connectors.yaml``: broker-owned, written atomically
(``broker.accounts.store``, mode 600) and only when an entry changed, re-read when it changes;
a file the operator left broken keeps the last good entries serving and is never written
over (enrollment answers 503 ``enrollment_paused`` until it is fixed).
Approved entries are connector identities to the ``KeyStore`` (``lookup``), with the
upstream LLM key set on the admin page. Bounds: ``MAX_PENDING`` pending entries,
``MAX_ENTRIES`` in all (the oldest rejected or revoked ones go first), and
``NEW_PER_ADDRESS`` new entries per address and hour, so the endpoint cannot fill the
disk. The ask's fields are capped by ``EnrollRequest``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.accounts.keys import ConnectorIdentity, hash_secret, new_connector_token
from broker.accounts.store import FileBroken, YamlFileStore
from broker.accounts.window import SlidingWindow
from broker.core.errors import BrokerError
from shared.errors import ConfigError
from shared.fingerprint import fingerprint_of_digest
from shared.logging import get_logger
from shared.protocol import EnrollRequest, EnrollResponse, EnrollStatus

log = get_logger("broker.accounts.enrollment")

T = TypeVar("T")

MAX_PENDING = 100
MAX_ENTRIES = 500
NEW_PER_ADDRESS = 10  # new entries per address and hour
ASKS_PER_ADDRESS = 120  # asks per address and minute (a connector asks every 3 s)
ASK_EVERY = 3.0  # seconds between a pending connector's asks
MAX_KEY = 4096


# An enrollment ask or an operator action that cannot be done (says why): the broker's
# one error type (``broker.core.errors``), answered by the relay like any other.
EnrollmentError = BrokerError


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class Enrolled(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    models: list[str] = Field(default_factory=list)
    address: str | None = None
    version: str = "unknown"
    status: EnrollStatus = EnrollStatus.PENDING
    secret_sha256: str | None = None
    token_sha256: str | None = None
    llm_api_key: str | None = None
    requested: datetime = Field(default_factory=_now)
    decided: datetime | None = None
    decided_by: str | None = None
    delivered: datetime | None = None

    @property
    def fingerprint(self) -> str | None:
        """What the connector prints while it waits (None once its token was delivered)."""
        return fingerprint_of_digest(self.secret_sha256) if self.secret_sha256 else None


class EnrolledFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    connectors: list[Enrolled] = Field(default_factory=list)

    def get(self, entry_id: str) -> Enrolled | None:
        return next((e for e in self.connectors if e.id == entry_id), None)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the relay answers an ask with."""

    status: int
    reply: EnrollResponse


def _parse(text: str, path: Path) -> EnrolledFile:
    try:
        return EnrolledFile.model_validate(yaml.safe_load(text) or {})
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


class EnrollmentStore:
    """The enrolled-connectors file, parsed; thread-safe; ``clock`` for the rate limits."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._index: dict[str, ConnectorIdentity] = {}
        self._new = SlidingWindow(NEW_PER_ADDRESS, 3600.0)
        self._asks = SlidingWindow(ASKS_PER_ADDRESS, 60.0)
        self.last_ask: dict[str, float] = {}  # entry id -> clock(), not written to disk
        self._file = YamlFileStore(
            path,
            name="enrolled",
            parse=_parse,
            dump=lambda doc: doc.model_dump(mode="json"),
            empty=EnrolledFile,
            installed=self._installed,
        )
        self.reload()

    # -- reading ----------------------------------------------------------------------------

    @property
    def error(self) -> str | None:
        """Why the file on disk is not what serves (None when it is)."""
        return self._file.error

    @property
    def _doc(self) -> EnrolledFile:
        return self._file.doc

    def reload(self) -> bool:
        """Re-read the file if it changed; a broken file is logged, the last good state kept."""
        return self._file.reload()

    def _installed(self, doc: EnrolledFile, present: bool) -> None:
        self._index = {
            # An enrolled connector serves the models it asked for and the operator approved.
            e.token_sha256: ConnectorIdentity(
                id=e.id, name=None, upstream_api_key=e.llm_api_key, models=frozenset(e.models)
            )
            for e in doc.connectors
            if e.status is EnrollStatus.APPROVED and e.token_sha256
        }

    @property
    def entries(self) -> list[Enrolled]:
        return list(self._doc.connectors)

    def closed_ids(self) -> set[str]:
        """Identities of entries that may not serve (pending, rejected, revoked)."""
        return {e.id for e in self._doc.connectors if e.status is not EnrollStatus.APPROVED}

    def lookup(self, token_sha256: str) -> ConnectorIdentity | None:
        """The KeyStore's hook: an approved connector's identity by its token's hash."""
        return self._index.get(token_sha256)

    def upstream_key(self, identity_id: str) -> str | None:
        """The KeyStore's hook: the operator's upstream LLM key of an approved connector."""
        for ident in self._index.values():
            if ident.id == identity_id:
                return ident.upstream_api_key
        return None

    # -- writing ----------------------------------------------------------------------------

    def _mutate(self, change: Callable[[EnrolledFile], T]) -> T:
        try:
            return self._file.mutate(change)
        except FileBroken as exc:
            # The operator's edit does not parse: nothing is written over it until fixed.
            raise EnrollmentError(
                503,
                "enrollment is paused while the operator fixes the broker's connectors file",
                "enrollment_paused",
                retry_after=60.0,
                type_="server_error",
            ) from exc

    def ask(self, req: EnrollRequest, address: str | None) -> Verdict:
        """A connector's ask: create or find its entry, and answer with the verdict."""
        now = self._clock()
        where = address or "unknown"
        wait = self._asks.allow(where, now)
        if wait:
            raise _slow_down(wait)
        digest = hash_secret(req.secret)
        entry = next((e for e in self._doc.connectors if e.secret_sha256 == digest), None)
        if entry is None:
            wait = self._new.allow(where, now)
            if wait:
                raise _slow_down(wait)
            entry = self._mutate(lambda doc: _upsert(doc, req, digest, address))
        elif entry.status is EnrollStatus.APPROVED:
            return self._deliver(entry.id, digest)
        self.last_ask[entry.id] = now
        return _verdict(entry)

    def _deliver(self, entry_id: str, digest: str) -> Verdict:
        token = new_connector_token()

        def change(doc: EnrolledFile) -> Enrolled:
            entry = doc.get(entry_id)
            if entry is None or entry.secret_sha256 != digest:
                raise EnrollmentError(409, "this enrollment changed; ask again", "conflict")
            entry.token_sha256, entry.secret_sha256, entry.delivered = (
                hash_secret(token),
                None,
                _now(),
            )
            return entry.model_copy()

        entry = self._mutate(change)
        log.info("enrollment_token_delivered", enrollment=entry.id, connector=entry.name)
        reply = EnrollResponse(
            status=EnrollStatus.APPROVED,
            enrollment_id=entry.id,
            message="approved: this is your connector token; it is shown only this once",
            token=token,
        )
        return Verdict(200, reply)

    def _decide(
        self, entry_id: str, by: str, allowed: set[EnrollStatus], to: EnrollStatus
    ) -> Enrolled:
        def change(doc: EnrolledFile) -> Enrolled:
            entry = doc.get(entry_id)
            if entry is None:
                raise EnrollmentError(404, f"no enrollment {entry_id!r}", "not_found")
            if entry.status not in allowed:
                raise EnrollmentError(
                    409, f"{entry.name} is {entry.status.value}, not {_names(allowed)}", "conflict"
                )
            entry.status, entry.decided, entry.decided_by = to, _now(), by
            if to is not EnrollStatus.APPROVED:
                entry.token_sha256 = None
                entry.secret_sha256 = entry.secret_sha256 if to is EnrollStatus.REJECTED else None
            return entry.model_copy()

        entry = self._mutate(change)
        log.info(
            "enrollment_decided", enrollment=entry.id, connector=entry.name, status=to.value, by=by
        )
        return entry

    def approve(self, entry_id: str, by: str) -> Enrolled:
        return self._decide(entry_id, by, {EnrollStatus.PENDING}, EnrollStatus.APPROVED)

    def reject(self, entry_id: str, by: str) -> Enrolled:
        return self._decide(entry_id, by, {EnrollStatus.PENDING}, EnrollStatus.REJECTED)

    def revoke(self, entry_id: str, by: str) -> Enrolled:
        """The token stops working at once (the caller ends the identity's sessions)."""
        return self._decide(entry_id, by, {EnrollStatus.APPROVED}, EnrollStatus.REVOKED)

    def set_llm_key(self, entry_id: str, key: str | None) -> Enrolled:
        key = (key or "").strip() or None
        if key is not None and (len(key) > MAX_KEY or any(ord(c) < 0x21 for c in key)):
            raise EnrollmentError(400, "an LLM key is one line without spaces", "invalid_key")

        def change(doc: EnrolledFile) -> Enrolled:
            entry = doc.get(entry_id)
            if entry is None or entry.status is not EnrollStatus.APPROVED:
                raise EnrollmentError(404, f"no approved connector {entry_id!r}", "not_found")
            entry.llm_api_key = key
            return entry.model_copy()

        return self._mutate(change)


def _upsert(doc: EnrolledFile, req: EnrollRequest, digest: str, address: str | None) -> Enrolled:
    """The entry of this secret (matched by the secret only), or a new pending one."""
    for entry in doc.connectors:
        if entry.secret_sha256 == digest:
            return entry.model_copy()  # made by a concurrent ask with this secret
    pending = sum(e.status is EnrollStatus.PENDING for e in doc.connectors)
    if pending >= MAX_PENDING:
        raise EnrollmentError(
            503,
            f"{MAX_PENDING} connectors are waiting for approval already; ask the operator",
            "enrollment_full",
            retry_after=60.0,
        )
    _prune(doc)
    ids = {e.id for e in doc.connectors}
    new_id = next(i for i in (f"e-{secrets.token_hex(4)}" for _ in range(100)) if i not in ids)
    entry = Enrolled(
        id=new_id,
        name=req.name,
        models=req.models,
        address=address,
        version=req.version,
        secret_sha256=digest,
    )
    doc.connectors.append(entry)
    log.info("enrollment_requested", enrollment=entry.id, connector=entry.name, address=address)
    return entry.model_copy()


def _prune(doc: EnrolledFile) -> None:
    """Keep at most MAX_ENTRIES - 1 entries: the oldest rejected or revoked ones go."""
    while len(doc.connectors) >= MAX_ENTRIES:
        done = [
            e for e in doc.connectors if e.status in (EnrollStatus.REJECTED, EnrollStatus.REVOKED)
        ]
        if not done:
            raise EnrollmentError(
                503, "the broker holds too many connectors; ask the operator", "enrollment_full"
            )
        doc.connectors.remove(min(done, key=lambda e: e.decided or e.requested))


def _verdict(entry: Enrolled) -> Verdict:
    if entry.status is EnrollStatus.PENDING:
        reply = EnrollResponse(
            status=entry.status,
            enrollment_id=entry.id,
            message="waiting for the operator's approval",
            retry_after_s=ASK_EVERY,
        )
        return Verdict(202, reply)
    if entry.status is EnrollStatus.REJECTED:
        message = "the operator rejected this connector"
    else:
        message = "this connector's enrollment was revoked"
    return Verdict(
        403, EnrollResponse(status=entry.status, enrollment_id=entry.id, message=message)
    )


def _slow_down(wait: float) -> EnrollmentError:
    return EnrollmentError(
        429,
        "too many enrollment requests from this address; wait",
        "rate_limited",
        retry_after=wait,
    )


def _names(statuses: set[EnrollStatus]) -> str:
    return " or ".join(sorted(s.value for s in statuses))
