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

from broker.accounts.store import YamlFileStore
from broker.core.limits import LimitOverrides
from shared.errors import ConfigError
from shared.logging import get_logger
from shared.model_names import InvalidModelName, check_model_names

if TYPE_CHECKING:
    from broker.accounts.revocations import RevocationBoard

log = get_logger("broker.accounts.keys")

CREDENTIALS_FILE = "credentials.yaml"
# The ASGI scope extension naming a user key by its SHA-256: set only by the broker's own
# in-process requests (the chat's replies, docs/chat.md); no network request can set it.
INTERNAL_KEY_HASH = "remotellm.key_sha256"


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
    # The key's scope (broker/accounts/key_scope.py): None is every model, never expires.
    models: frozenset[str] | None = None
    expires: float | None = None


@dataclass(frozen=True, slots=True)
class ConnectorIdentity:
    id: str
    name: str | None
    upstream_api_key: str | None
    # The models this identity may serve (broker/relay/claims.py); None: any model.
    models: frozenset[str] | None = None


def _mapping(text: str, path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping")
    return data


def _credentials(text: str, path: Path) -> dict[str, Any]:
    """``credentials.yaml`` as written (entries that are not mappings are skipped)."""
    return _mapping(text, path)


def _connector_config(text: str, path: Path) -> dict[str, ConnectorIdentity]:
    """The operator's ``connectors.yaml``: identities by token hash."""
    entries = _mapping(text, path).get("connectors") or []
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
    _unique_ids(path, found.values())
    return found


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
        self._credentials: YamlFileStore[dict[str, Any]] = YamlFileStore(
            self.credentials_path, name="credentials", parse=_credentials, dump=dict, empty=dict
        )
        self._config: YamlFileStore[dict[str, ConnectorIdentity]] | None = None
        if connector_config is not None:
            # Operator-owned and never written; a missing file keeps the last view.
            self._config = YamlFileStore(
                connector_config,
                name="connectors",
                parse=_connector_config,
                empty=dict,
                required=True,
            )
        self._users: dict[str, UserKey] = {}
        self._connectors: dict[str, ConnectorIdentity] = {}
        self._more_users: Callable[[str], UserKey | None] | None = None
        self._more_connectors: Callable[[str], ConnectorIdentity | None] | None = None
        self._more_upstream_keys: Callable[[str], str | None] | None = None
        self._board: RevocationBoard | None = None
        self.reload(force=True)

    def attach_users(self, lookup: Callable[[str], UserKey | None]) -> None:
        """Also accept the keys ``lookup`` knows by hash (the portal's users file)."""
        self._more_users = lookup

    def attach_revocations(self, board: RevocationBoard) -> None:
        """Refuse the keys and users on the brokers' shared board (docs/scale-out.md)."""
        self._board = board

    def attach_connectors(
        self,
        lookup: Callable[[str], ConnectorIdentity | None],
        upstream_key: Callable[[str], str | None],
    ) -> None:
        """Also accept the tokens ``lookup`` knows by hash (enrolled connectors), whose
        upstream LLM keys ``upstream_key`` gives by identity id."""
        self._more_connectors = lookup
        self._more_upstream_keys = upstream_key

    # -- loading --------------------------------------------------------------------------

    def _files(self) -> list[YamlFileStore[Any]]:
        return [f for f in (self._credentials, self._config) if f is not None]

    def reload(self, force: bool = False) -> bool:
        """Re-read the YAML files if they changed; a broken file keeps its last good view.

        ``force`` (at start): read both files and raise on a broken or missing one.
        """
        if force:
            for file in self._files():
                file.load()
        else:
            changed = [file.reload() for file in self._files()]
            if not any(changed):
                return False
        try:
            users, connectors = self._merged()
        except ConfigError as exc:
            if force:
                raise
            log.error("key_reload_failed", error=str(exc))
            return False
        self._users, self._connectors = users, connectors
        if not force:
            log.info("keys_reloaded", users=len(users), connectors=len(connectors))
        return True

    def _merged(self) -> tuple[dict[str, UserKey], dict[str, ConnectorIdentity]]:
        users = dict(self._static_users)
        connectors = dict(self._static_connectors)
        if self._config is not None:
            connectors.update(self._config.doc)
        data = self._credentials.doc
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

    def ensure_credentials(self) -> GeneratedCredentials:
        """Create a user key and/or connector token when none exists; return the new ones."""
        user_key = None if self._users else new_user_key()
        token = None if self._connectors else new_connector_token()
        if user_key is None and token is None:
            return GeneratedCredentials(None, None)

        def add(data: dict[str, Any]) -> None:
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

        self._credentials.mutate(add)
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
        return self.user_by_hash(hash_secret(key))

    def user_by_hash(self, digest: str) -> UserKey | None:
        """The key's user by the key's SHA-256 (revocations, scopes and blocks applied)."""
        found = self._users.get(digest)
        if found is None and self._more_users is not None:
            found = self._more_users(digest)
        board = self._board
        if found is None or board is None:
            return found
        if board.revoked(digest):
            return None  # revoked on another broker: as unknown as a deleted key
        scoped = board.scope(digest)
        if scoped is not None:  # the last scope change any broker saw wins
            found = replace(found, models=scoped.models, expires=scoped.expires)
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
        """The upstream LLM key of a connector identity, configured or enrolled (the Redis
        mode keeps none in Redis: it asks here when it hands a request over)."""
        for ident in self._connectors.values():
            if ident.id == identity_id:
                return ident.upstream_api_key
        if self._more_upstream_keys is not None:
            return self._more_upstream_keys(identity_id)
        return None


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
