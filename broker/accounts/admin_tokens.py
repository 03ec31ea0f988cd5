"""Admin tokens: bearer secrets for the admin API (``/admin/v1``), read-only or read-write.

Created by ``remotellm-broker admin-tokens create`` (the secret is printed once), listed
and revoked there. Like every other secret only the token's SHA-256 is kept
(``broker.accounts.keys.hash_secret``), in ``<data-dir>/admin_tokens.yaml`` (broker-owned,
mode 600, written atomically by ``broker.accounts.store``); the running broker re-reads it
when it changes, so a token created or revoked on the host works or stops at its next
request. A revoked token stays listed (with when it was revoked) and never works again.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.accounts.keys import hash_secret
from broker.accounts.store import YamlFileStore
from shared.errors import ConfigError

Scope = Literal["read", "write"]
SCOPES: tuple[Scope, ...] = ("read", "write")
TOKEN_PREFIX = "rla-"
MAX_LABEL = 100
MAX_TOKENS = 1000

T = TypeVar("T")


class AdminTokenRefused(ValueError):
    """A token action that cannot be done (the message says why)."""


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class AdminToken(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str  # "at-" + 8 hex digits of the hash: names the token, reveals nothing
    label: str = Field(default="", max_length=MAX_LABEL)
    scope: Scope
    token_sha256: str
    prefix: str  # the secret's first characters, to recognise it
    created: datetime = Field(default_factory=_now)
    created_by: str = ""
    revoked: datetime | None = None

    def public(self) -> dict[str, object]:
        """What may be shown: everything but the hash."""
        return self.model_dump(mode="json", exclude={"token_sha256"})


class AdminTokensFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[AdminToken] = Field(default_factory=list)


def _parse(text: str, path: Path) -> AdminTokensFile:
    try:
        return AdminTokensFile.model_validate(yaml.safe_load(text) or {})
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def new_admin_token() -> str:
    return TOKEN_PREFIX + secrets.token_hex(24)


class AdminTokenStore:
    """The admin tokens file, parsed; thread-safe (the file store's lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._index: dict[str, AdminToken] = {}
        self._file = YamlFileStore(
            path,
            name="admin tokens",
            parse=_parse,
            dump=lambda doc: doc.model_dump(mode="json"),
            empty=AdminTokensFile,
            installed=self._installed,
        )
        self._file.reload()

    @property
    def error(self) -> str | None:
        return self._file.error

    def _installed(self, doc: AdminTokensFile, present: bool) -> None:
        self._index = {t.token_sha256: t for t in doc.tokens if t.revoked is None}

    @property
    def tokens(self) -> list[AdminToken]:
        return list(self._file.doc.tokens)

    def lookup(self, secret: str) -> AdminToken | None:
        """The live token whose secret this is (the file re-read if it changed)."""
        self._file.reload()
        return self._index.get(hash_secret(secret))

    def _mutate(self, change: Callable[[AdminTokensFile], T]) -> T:
        return self._file.mutate(change)

    def create(self, scope: Scope, label: str, by: str) -> tuple[str, AdminToken]:
        """A new token: its secret (shown once) and its entry."""
        if scope not in SCOPES:
            raise AdminTokenRefused(f"scope must be one of {', '.join(SCOPES)}")
        if len(label) > MAX_LABEL or not label.isprintable():
            raise AdminTokenRefused(f"a label is at most {MAX_LABEL} printable characters")
        secret = new_admin_token()
        digest = hash_secret(secret)
        entry = AdminToken(
            id="at-" + digest[:8],
            label=label,
            scope=scope,
            token_sha256=digest,
            prefix=secret[: len(TOKEN_PREFIX) + 6],
            created_by=by,
        )

        def change(doc: AdminTokensFile) -> AdminToken:
            if len(doc.tokens) >= MAX_TOKENS:
                raise AdminTokenRefused(f"at most {MAX_TOKENS} admin tokens: revoke old ones")
            doc.tokens.append(entry)
            return entry

        return secret, self._mutate(change)

    def revoke(self, token_id: str) -> AdminToken:
        def change(doc: AdminTokensFile) -> AdminToken:
            found = next((t for t in doc.tokens if t.id == token_id), None)
            if found is None:
                raise AdminTokenRefused(f"no admin token {token_id!r} in {self.path}")
            if found.revoked is None:
                found.revoked = _now()
            return found.model_copy()

        return self._mutate(change)
