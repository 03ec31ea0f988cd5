"""User API keys and connector tokens: stored hashed, looked up by hash, reloaded on change.

Sources, all merged:
- static keys and tokens from flags or the environment;
- ``connectors.yaml`` (operator-edited: plain tokens mapped to an upstream LLM key);
- ``credentials.yaml`` in the data dir (generated at first start: only SHA-256 hashes).

A key is 16 random bytes (32 hex characters), so a plain SHA-256 is a safe verifier:
there is nothing to brute-force. Lookups go through a dict keyed by the hash, so the
comparison never depends on how much of a guessed key matches.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from broker.core.limits import LimitOverrides
from shared.errors import ConfigError
from shared.files import write_atomic
from shared.logging import get_logger
from shared.model_names import InvalidModelName, check_model_names

if TYPE_CHECKING:
    from broker.accounts.revocations import RevocationBoard

log = get_logger("broker.accounts.keys")

CREDENTIALS_FILE = "credentials.yaml"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def user_id(key_sha256: str) -> str:
    """A user's ID where the file gives none: stable however the entries are ordered.

    A short prefix of the key's hash names the entry without revealing the key.
    """
    return "u-" + key_sha256[:8]


def connector_id(token_sha256: str) -> str:
    """A connector identity's ID where the file gives none (see ``user_id``)."""
    return "c-" + token_sha256[:8]


def new_user_key() -> str:
    return "sk-" + secrets.token_hex(16)


def new_connector_token() -> str:
    return "ct-" + secrets.token_hex(24)


@dataclass(frozen=True, slots=True)
class UserKey:
    id: str
    name: str
    blocked: bool = False
    # Overrides of the default limits (users file): for the user, and for this key alone.
    limits: LimitOverrides | None = None
    key_limits: LimitOverrides | None = None


@dataclass(frozen=True, slots=True)
class ConnectorIdentity:
    id: str
    name: str | None
    upstream_api_key: str | None
    # The models this identity may serve (broker/relay/claims.py); None: any model.
    models: frozenset[str] | None = None


def write_yaml_atomic(path: Path, data: Any) -> None:
    """Write an operator-editable YAML file durably (``shared.files.write_atomic``, mode 600)."""
    write_atomic(path, yaml.safe_dump(data, sort_keys=False))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping")
    return data


def _mtime(path: Path | None) -> float | None:
    if path is None:
        return None
    try:
        return path.stat().st_mtime_ns / 1e9
    except OSError:
        return None


def _identity(entry: dict[str, Any], digest: str) -> ConnectorIdentity:
    name, key = entry.get("name"), entry.get("llm_api_key")
    return ConnectorIdentity(
        id=str(entry.get("id") or connector_id(digest)),
        name=str(name) if name else None,
        upstream_api_key=str(key) if key else None,
        models=_allowed_models(entry.get("models")),
    )


def _allowed_models(value: object) -> frozenset[str] | None:
    """A connectors-file entry's optional ``models:`` list (absent: any model)."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise ConfigError("a connector's 'models' must be a list of model names")
    try:
        return frozenset(check_model_names(value))
    except InvalidModelName as exc:
        raise ConfigError(f"a connector's 'models': {exc}") from None


def _unique_ids(path: Path, entries: Iterable[UserKey | ConnectorIdentity]) -> None:
    # Usage records and sessions are keyed by these IDs: two entries must not share one.
    seen: set[str] = set()
    for entry in entries:
        if entry.id in seen:
            raise ConfigError(f"{path}: two entries have the id {entry.id!r}; give each its own")
        seen.add(entry.id)


@dataclass(frozen=True, slots=True)
class GeneratedCredentials:
    user_key: str | None
    connector_token: str | None


class KeyStore:
    def __init__(
        self,
        *,
        static_user_keys: list[str],
        static_connector_tokens: list[str],
        connector_config: Path | None,
        data_dir: Path,
    ) -> None:
        self._static_users = {
            digest: UserKey(id=user_id(digest), name=user_id(digest))
            for digest in map(hash_secret, static_user_keys)
        }
        self._static_connectors = {
            digest: ConnectorIdentity(id=connector_id(digest), name=None, upstream_api_key=None)
            for digest in map(hash_secret, static_connector_tokens)
        }
        self.connector_config = connector_config
        self.credentials_path = data_dir / CREDENTIALS_FILE
        self._users: dict[str, UserKey] = {}
        self._connectors: dict[str, ConnectorIdentity] = {}
        self._stamps: tuple[float | None, float | None] = (None, None)
        self._more_users: Callable[[str], UserKey | None] | None = None
        self._more_connectors: Callable[[str], ConnectorIdentity | None] | None = None
        self._board: RevocationBoard | None = None
        self.reload(force=True)

    def attach_users(self, lookup: Callable[[str], UserKey | None]) -> None:
        """Also accept the keys ``lookup`` knows by hash (the portal's users file)."""
        self._more_users = lookup

    def attach_revocations(self, board: RevocationBoard) -> None:
        """Refuse the keys and users on the brokers' shared board (docs/scale-out.md)."""
        self._board = board

    def attach_connectors(self, lookup: Callable[[str], ConnectorIdentity | None]) -> None:
        """Also accept the tokens ``lookup`` knows by hash (enrolled connectors)."""
        self._more_connectors = lookup

    # -- loading --------------------------------------------------------------------------

    def reload(self, force: bool = False) -> bool:
        """Re-read the YAML files if they changed; keep the old view if a file is broken."""
        stamps = (_mtime(self.connector_config), _mtime(self.credentials_path))
        if not force and stamps == self._stamps:
            return False
        try:
            users, connectors = self._load()
        except ConfigError as exc:
            if force:
                raise
            log.error("key_reload_failed", error=str(exc))
            self._stamps = stamps
            return False
        self._users, self._connectors, self._stamps = users, connectors, stamps
        if not force:
            log.info("keys_reloaded", users=len(users), connectors=len(connectors))
        return True

    def _load(self) -> tuple[dict[str, UserKey], dict[str, ConnectorIdentity]]:
        users = dict(self._static_users)
        connectors = dict(self._static_connectors)
        if self.connector_config is not None:
            connectors.update(self._load_connector_config(self.connector_config))
        if self.credentials_path.exists():
            data = _read_yaml(self.credentials_path)
            for entry in data.get("users") or []:
                if isinstance(entry, dict) and isinstance(entry.get("key_sha256"), str):
                    digest = entry["key_sha256"]
                    users[digest] = UserKey(
                        id=str(entry.get("id") or user_id(digest)),
                        name=str(entry.get("name") or "user"),
                        blocked=bool(entry.get("blocked", False)),
                    )
            for entry in data.get("connectors") or []:
                if isinstance(entry, dict) and isinstance(entry.get("token_sha256"), str):
                    connectors[entry["token_sha256"]] = _identity(entry, entry["token_sha256"])
        _unique_ids(self.credentials_path, users.values())
        _unique_ids(self.connector_config or self.credentials_path, connectors.values())
        return users, connectors

    @staticmethod
    def _load_connector_config(path: Path) -> dict[str, ConnectorIdentity]:
        if not path.exists():
            raise ConfigError(f"connector config {path} does not exist")
        entries = _read_yaml(path).get("connectors") or []
        if not isinstance(entries, list):
            raise ConfigError(f"{path}: 'connectors' must be a list")
        found: dict[str, ConnectorIdentity] = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
                raise ConfigError(f"{path}: entry {i + 1} needs a token")
            digest = hash_secret(entry["token"])
            try:
                found[digest] = _identity(entry, digest)
            except ConfigError as exc:
                raise ConfigError(f"{path}: entry {i + 1}: {exc}") from None
        return found

    def ensure_credentials(self) -> GeneratedCredentials:
        """Create a user key and/or connector token when none exists; return the new ones."""
        user_key = None if self._users else new_user_key()
        token = None if self._connectors else new_connector_token()
        if user_key is None and token is None:
            return GeneratedCredentials(None, None)
        data: dict[str, Any] = (
            _read_yaml(self.credentials_path) if self.credentials_path.exists() else {}
        )
        if user_key is not None:
            data.setdefault("users", []).append(
                {
                    "id": user_id(hash_secret(user_key)),
                    "name": "default",
                    "key_sha256": hash_secret(user_key),
                    "blocked": False,
                }
            )
        if token is not None:
            data.setdefault("connectors", []).append(
                {"id": connector_id(hash_secret(token)), "token_sha256": hash_secret(token)}
            )
        write_yaml_atomic(self.credentials_path, data)
        self.reload(force=True)
        return GeneratedCredentials(user_key, token)

    # -- lookups --------------------------------------------------------------------------

    @property
    def has_users(self) -> bool:
        return bool(self._users)

    @property
    def has_connectors(self) -> bool:
        return bool(self._connectors)

    def user(self, key: str) -> UserKey | None:
        digest = hash_secret(key)
        found = self._users.get(digest)
        if found is None and self._more_users is not None:
            found = self._more_users(digest)
        board = self._board
        if found is None or board is None:
            return found
        if board.revoked(digest):
            return None  # revoked on another broker: as unknown as a deleted key
        if board.blocked(found.id) and not found.blocked:
            return replace(found, blocked=True)
        return found

    def revocations_stale(self) -> bool:
        """True when the shared revocations could not be read lately (then refuse all)."""
        return self._board is not None and self._board.stale()

    def connector(self, token: str) -> ConnectorIdentity | None:
        digest = hash_secret(token)
        found = self._connectors.get(digest)
        if found is None and self._more_connectors is not None:
            found = self._more_connectors(digest)
        return found

    def upstream_key(self, identity_id: str) -> str | None:
        """The upstream LLM key of a connector identity (the Redis mode keeps none in Redis)."""
        for ident in self._connectors.values():
            if ident.id == identity_id:
                return ident.upstream_api_key
        return None


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
