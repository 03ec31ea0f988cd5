"""Portal users and their API keys in one operator-editable YAML file (``--users-file``).

The file holds, per GitLab user, the id, username, ``blocked`` and the keys as SHA-256
hashes with name, a short prefix, created and last-used times; never a usable key.

- Reads: the broker keeps the last good parse in memory (a dict keyed by key hash for the
  API's hot path) and re-reads the file when its stamp changes. A malformed file is
  reported (``users_file_invalid``, ``error``) and the last good state keeps serving.
- Writes (portal, ``remotellm-broker users``): under an ``flock`` on a sidecar lock file
  the file is re-read if it changed, the change applied, and the result written atomically
  (temp + rename, mode 600), so the broker and an operator's CLI never undo each other.
- Last-used times are only noted in memory on the hot path; ``flush_last_used`` writes them
  in one batch from a background task.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from broker.accounts import key_scope
from broker.accounts.identities import IdentityClash
from broker.accounts.key_scope import Allowance, GroupRule, ScopeRefused
from broker.accounts.keys import UserKey, hash_secret, new_user_key
from broker.accounts.store import FileBroken, YamlFileStore
from broker.accounts.users_change import BoardScope, UsersChange, scope_changes, users_change
from broker.core.limits import LIMIT_FIELDS, LimitOverrides, Override
from shared.errors import ConfigError
from shared.logging import get_logger
from shared.model_names import InvalidModelName, check_model_names

log = get_logger("broker.accounts.users")

T = TypeVar("T")
PREFIX_CHARS = 9  # "sk-" and 6 hex characters: enough to tell keys apart, useless to guess
MAX_KEYS = 20
KEY_NAME = re.compile(r"^[\w .@:/+-]{1,40}$")
FIRST_KEY_NAME = "default"


# The users file cannot be read or parsed (the message says where); changes wait for a fix.
UsersFileError = FileBroken


class KeyActionRefused(ValueError):
    """A key operation the user asked for cannot be done (the message says why)."""


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


LimitValue = PositiveInt | Literal["unlimited"] | None


class LimitsEntry(BaseModel):
    """Overrides of the default limits; a missing (null) one follows the broker's settings."""

    model_config = ConfigDict(extra="forbid")

    rpm: LimitValue = None
    tpm: LimitValue = None
    concurrency: LimitValue = None
    daily_tokens: LimitValue = None
    monthly_tokens: LimitValue = None

    def overrides(self) -> LimitOverrides:
        return LimitOverrides(**{name: getattr(self, name) for name in LIMIT_FIELDS})


def _limits_or_none(entry: LimitsEntry | None) -> LimitOverrides | None:
    if entry is None:
        return None
    found = entry.overrides()
    return None if found.empty else found


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    prefix: str
    sha256: str
    created: datetime
    last_used: datetime | None = None
    limits: LimitsEntry | None = None
    # The scope (broker/accounts/key_scope.py): None is every model, never, no label.
    models: list[str] | None = None
    expires: datetime | None = None
    label: str | None = None

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _model_list(value)

    def is_expired(self, now: float) -> bool:
        return key_scope.expired(_epoch(self.expires), now)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("must be the 64 hex characters of a SHA-256 (never a plain key)")
        return value


def _model_list(value: list[str]) -> list[str]:
    try:
        return sorted(set(check_model_names(value)))
    except InvalidModelName as exc:
        raise ValueError(str(exc)) from None


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _stamp(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(int(value), UTC)


class GroupDefaults(BaseModel):
    """``key_defaults``: what a GitLab group's members may give their keys."""

    model_config = ConfigDict(extra="forbid")

    group: str = Field(min_length=1, max_length=200)
    models: list[str] | None = None
    lifetime: str | None = None  # 30d, 12h, 2w ... (key_scope.parse_duration)

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _model_list(value)

    @field_validator("lifetime")
    @classmethod
    def _lifetime(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                key_scope.parse_duration(value)
            except ScopeRefused as exc:
                raise ValueError(str(exc)) from None
        return value

    def rule(self) -> GroupRule:
        models = None if self.models is None else frozenset(self.models)
        lifetime = None if self.lifetime is None else key_scope.parse_duration(self.lifetime)
        return GroupRule(self.group, models, lifetime)


class UserEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gitlab_id: int
    username: str
    name: str = ""
    blocked: bool = False
    created: datetime = Field(default_factory=_now)
    last_login: datetime | None = None
    keys: list[KeyEntry] = Field(default_factory=list)
    limits: LimitsEntry | None = None
    # OpenID Connect users only (broker.accounts.identities): absent for GitLab users.
    provider: str | None = Field(None, exclude_if=lambda v: v is None)
    subject: str | None = Field(None, exclude_if=lambda v: v is None)
    # Groups seen at the last login (GitLab's with --gitlab-allowed-group; an OIDC
    # provider's groups claim): their key defaults apply to new keys.
    groups: list[str] = Field(default_factory=list)

    @property
    def user_id(self) -> str:
        if self.provider:
            return f"{self.provider}-{-self.gitlab_id}"
        return f"gitlab-{self.gitlab_id}"

    def key(self, name: str) -> KeyEntry | None:
        return next((k for k in self.keys if k.name == name), None)


class UsersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    users: list[UserEntry] = Field(default_factory=list)
    key_defaults: list[GroupDefaults] = Field(default_factory=list)

    def user(self, gitlab_id: int) -> UserEntry | None:
        return next((u for u in self.users if u.gitlab_id == gitlab_id), None)

    def find(self, selector: str) -> UserEntry | None:
        """A user by GitLab username or numeric id (the CLI's way to name one)."""
        for user in self.users:
            if user.username == selector or str(user.gitlab_id) == selector:
                return user
        return None


@dataclass(frozen=True, slots=True)
class LoginResult:
    user: UserEntry
    first_key: str | None


def parse_users(text: str, path: Path) -> UsersFile:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UsersFileError(f"{path} is not valid YAML: {exc}") from exc
    try:
        doc = UsersFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UsersFileError(f"{path}: {where}: {first['msg']}") from exc
    seen: set[str] = set()
    for user in doc.users:
        for key in user.keys:
            if key.sha256 in seen:
                raise UsersFileError(f"{path}: the key hash {key.prefix}… appears twice")
            seen.add(key.sha256)
    return doc


def new_key_entry(name: str, now: float | None = None) -> tuple[str, KeyEntry]:
    secret = new_user_key()
    created = _now() if now is None else datetime.fromtimestamp(int(now), UTC)
    entry = KeyEntry(
        name=name, prefix=secret[:PREFIX_CHARS], sha256=hash_secret(secret), created=created
    )
    return secret, entry


def parse_models(text: str) -> frozenset[str] | None:
    return key_scope.parse_models(text)


def _board_scopes(index: dict[str, UserKey]) -> dict[str, BoardScope]:
    return {d: BoardScope(k.models, k.expires) for d, k in index.items()}


def _listed(models: frozenset[str] | None) -> list[str] | None:
    return None if models is None else sorted(models)


def _models_now(entry: KeyEntry) -> frozenset[str] | None:
    return None if entry.models is None else frozenset(entry.models)


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return str(exc)


def check_key_name(name: str) -> str:
    name = name.strip()
    if not KEY_NAME.match(name):
        raise KeyActionRefused("A key name is 1 to 40 letters, digits, spaces or . @ : / + - _")
    return name


class UsersStore:
    """The users file, parsed; thread-safe; every write re-reads what changed on disk first."""

    def __init__(
        self,
        path: Path,
        clock: Callable[[], float] = time.time,
        max_key_lifetime: float | None = None,
    ) -> None:
        self.path = path
        self._clock = clock
        self.max_key_lifetime = max_key_lifetime
        self._index: dict[str, UserKey] = {}
        self._used: dict[str, float] = {}
        self._blocked: frozenset[str] = frozenset()
        self._watch: Callable[[UsersChange], None] | None = None
        self._file = YamlFileStore(
            path,
            name="users",
            parse=parse_users,
            dump=lambda doc: doc.model_dump(mode="json", exclude_none=False),
            empty=UsersFile,
            installed=self._installed,
        )
        self.reload()

    # -- reading ----------------------------------------------------------------------------

    @property
    def error(self) -> str | None:
        """Why the file on disk is not what serves (None when it is)."""
        return self._file.error

    @property
    def _doc(self) -> UsersFile:
        return self._file.doc

    def reload(self) -> bool:
        """Re-read the file if it changed; keep the last good state if it is broken."""
        return self._file.reload()

    def _installed(self, doc: UsersFile, present: bool) -> None:
        index: dict[str, UserKey] = {}
        for user in doc.users:
            limits = _limits_or_none(user.limits)
            for key in user.keys:
                index[key.sha256] = UserKey(
                    id=user.user_id,
                    name=key.name,
                    blocked=user.blocked,
                    limits=limits,
                    key_limits=_limits_or_none(key.limits),
                    models=None if key.models is None else frozenset(key.models),
                    expires=_epoch(key.expires),
                )
        blocked = frozenset(user.user_id for user in doc.users if user.blocked)
        if self._watch is not None and present:
            # A missing file (mid-deploy, say) revokes nothing on the other brokers.
            before = {digest: key.id for digest, key in self._index.items()}
            after = {digest: key.id for digest, key in index.items()}
            change = users_change(before, after, self._blocked, blocked)
            scopes = scope_changes(_board_scopes(self._index), _board_scopes(index))
            self._watch(replace(change, scopes=scopes) if scopes else change)
        self._index, self._blocked = index, blocked

    def watch(self, callback: Callable[[UsersChange], None]) -> None:
        """Tell ``callback`` what each later load changes (and now: who is blocked)."""
        with self._file.locked():
            self._watch = callback
            callback(users_change(None, {}, frozenset(), self._blocked))

    @property
    def users(self) -> list[UserEntry]:
        return list(self._doc.users)

    @property
    def key_defaults(self) -> list[GroupDefaults]:
        return list(self._doc.key_defaults)

    def user(self, gitlab_id: int) -> UserEntry | None:
        return self._doc.user(gitlab_id)

    def lookup(self, key_hash: str) -> UserKey | None:
        """The API's hot path: a dict look-up, and a note of the time for last-used."""
        found = self._index.get(key_hash)
        if found is not None:
            self._used[key_hash] = self._clock()
        return found

    def last_used(self, key: KeyEntry) -> datetime | None:
        """Last use including what is not flushed yet, so the portal shows it at once."""
        pending = self._used.get(key.sha256)
        if pending is None:
            return key.last_used
        return datetime.fromtimestamp(int(pending), UTC)

    # -- writing ----------------------------------------------------------------------------

    def _mutate(self, change: Callable[[UsersFile], T]) -> T:
        return self._file.mutate(change)

    def login(
        self,
        gitlab_id: int,
        username: str,
        name: str,
        identity: tuple[str, str] | None = None,
        groups: tuple[str, ...] = (),
    ) -> LoginResult:
        """Record a login; a user seen for the first time gets a first key (scoped by the
        defaults of their groups).

        ``identity`` is (provider, subject) of an OpenID Connect login; an existing user
        with that ID but another identity raises IdentityClash.
        """
        provider, subject = identity or (None, None)

        def change(doc: UsersFile) -> LoginResult:
            user = doc.user(gitlab_id)
            first_key = None
            if user is not None and (user.provider, user.subject) != (provider, subject):
                raise IdentityClash(f"user id {gitlab_id} belongs to another identity")
            if user is None:
                user = UserEntry(
                    gitlab_id=gitlab_id,
                    username=username,
                    name=name,
                    provider=provider,
                    subject=subject,
                )
                user.groups = sorted(groups)
                first_key, entry = new_key_entry(FIRST_KEY_NAME, self._clock())
                self._default_scope(doc, user, entry)
                user.keys.append(entry)
                doc.users.append(user)
            if groups:  # read only with --gitlab-allowed-group: else keep what is known
                user.groups = sorted(groups)
            user.username, user.name, user.last_login = username, name, _now()
            return LoginResult(user.model_copy(deep=True), first_key)

        return self._mutate(change)

    def _user_change(
        self, gitlab_id: int, change: Callable[[UserEntry, UsersFile], T]
    ) -> Callable[[UsersFile], T]:
        def apply(doc: UsersFile) -> T:
            user = doc.user(gitlab_id)
            if user is None:
                raise KeyActionRefused("This user is not in the users file any more.")
            if user.blocked:
                raise KeyActionRefused("This user is blocked.")
            return change(user, doc)

        return apply

    # -- scopes -----------------------------------------------------------------------------

    def allowance(self, user: UserEntry) -> Allowance:
        """What ``user`` may give their own keys (their groups' defaults, the cap)."""
        return self._allowance(self._doc, user)

    def _allowance(self, doc: UsersFile, user: UserEntry) -> Allowance:
        rules = [entry.rule() for entry in doc.key_defaults]
        return key_scope.allowance_for(user.groups, rules, self.max_key_lifetime)

    def _default_scope(self, doc: UsersFile, user: UserEntry, entry: KeyEntry) -> None:
        allowance = self._allowance(doc, user)
        entry.models = _listed(allowance.models)
        entry.expires = _stamp(key_scope.default_expiry(allowance, self._clock()))

    def _user_scope(
        self, doc: UsersFile, user: UserEntry, entry: KeyEntry, ask: key_scope.ScopeAsk
    ) -> None:
        """Apply a scope a user asked for to their key, within their allowance."""
        now = self._clock()
        try:
            models = _models_now(entry) if ask.models is None else parse_models(ask.models)
            expires = _epoch(entry.expires)
            if ask.expiry is not None and ask.expiry.strip():
                expires = key_scope.parse_expiry(ask.expiry, now)
            label = entry.label if ask.label is None else key_scope.check_label(ask.label)
            models, expires = key_scope.user_scope(self._allowance(doc, user), models, expires, now)
        except ScopeRefused as exc:
            raise KeyActionRefused(str(exc)) from None
        entry.models, entry.expires, entry.label = _listed(models), _stamp(expires), label or None

    def create_key(self, gitlab_id: int, name: str, ask: key_scope.ScopeAsk | None = None) -> str:
        name = check_key_name(name)

        def change(user: UserEntry, doc: UsersFile) -> str:
            if user.key(name) is not None:
                raise KeyActionRefused(f"You already have a key named {name!r}.")
            if len(user.keys) >= MAX_KEYS:
                raise KeyActionRefused(f"You have {MAX_KEYS} keys already; delete one first.")
            secret, entry = new_key_entry(name, self._clock())
            self._default_scope(doc, user, entry)
            self._user_scope(doc, user, entry, ask or key_scope.ScopeAsk())
            user.keys.append(entry)
            return secret

        return self._mutate(self._user_change(gitlab_id, change))

    def scope_key(self, gitlab_id: int, name: str, ask: key_scope.ScopeAsk) -> KeyEntry:
        """A user changes the scope, expiry or label of their own key (within bounds)."""

        def change(user: UserEntry, doc: UsersFile) -> KeyEntry:
            entry = user.key(name)
            if entry is None:
                raise KeyActionRefused(f"You have no key named {name!r}.")
            if entry.is_expired(self._clock()):
                raise KeyActionRefused(
                    f"{name!r} has expired: regenerate it (or create a new key) instead."
                )
            self._user_scope(doc, user, entry, ask)
            return entry.model_copy()

        return self._mutate(self._user_change(gitlab_id, change))

    def regenerate_key(self, gitlab_id: int, name: str, create: bool = False) -> str:
        """A new secret under the same name and scope; the old one stops working at once.

        The new secret lives as long as the old one did, from now, and never longer than
        ``--max-key-lifetime``: an expired key cannot come back as a never-expiring one."""

        def change(user: UserEntry, doc: UsersFile) -> str:
            old = user.key(name)
            if old is None and not create:
                raise KeyActionRefused(f"You have no key named {name!r}.")
            secret, entry = new_key_entry(name, self._clock())
            if old is None:
                self._default_scope(doc, user, entry)
                user.keys.append(entry)
                return secret
            allowance = self._allowance(doc, user)
            expires = key_scope.renewed_expiry(
                allowance, old.created.timestamp(), _epoch(old.expires), self._clock()
            )
            entry.models, entry.label, entry.expires = old.models, old.label, _stamp(expires)
            user.keys[user.keys.index(old)] = entry
            return secret

        return self._mutate(self._user_change(gitlab_id, change))

    def delete_key(self, gitlab_id: int, name: str) -> None:
        def change(user: UserEntry, doc: UsersFile) -> None:
            old = user.key(name)
            if old is None:
                raise KeyActionRefused(f"You have no key named {name!r}.")
            user.keys.remove(old)

        self._mutate(self._user_change(gitlab_id, change))

    # -- operator commands (by username or id) ---------------------------------------------

    def set_blocked(self, selector: str, blocked: bool) -> UserEntry:
        def change(doc: UsersFile) -> UserEntry:
            user = doc.find(selector)
            if user is None:
                raise KeyActionRefused(f"no user {selector!r} in {self.path}")
            user.blocked = blocked
            return user.model_copy(deep=True)

        return self._mutate(change)

    def set_limits(
        self,
        selector: str,
        values: dict[str, Override],
        *,
        key: str | None = None,
        replace: bool = False,
    ) -> UserEntry:
        """Change the limit overrides of a user (or of one key, by name or prefix).

        ``values`` maps limit names (``rpm``, ``tpm``, ``concurrency``, ``daily_tokens``,
        ``monthly_tokens``) to a number, ``"unlimited"``, or ``None`` for "as the defaults
        say". With ``replace`` the overrides become exactly ``values``; otherwise the names
        given change and the others stay. The running broker applies it at its next reload.
        """
        unknown = sorted(set(values) - set(LIMIT_FIELDS))
        if unknown:
            raise KeyActionRefused(f"unknown limit {unknown[0]!r}; use {', '.join(LIMIT_FIELDS)}")

        def change(doc: UsersFile) -> UserEntry:
            user = doc.find(selector)
            if user is None:
                raise KeyActionRefused(f"no user {selector!r} in {self.path}")
            target: UserEntry | KeyEntry = user
            if key is not None:
                found = [k for k in user.keys if key in (k.name, k.prefix)]
                if len(found) != 1:
                    raise KeyActionRefused(f"{selector} has no key named or prefixed {key!r}")
                target = found[0]
            current = {} if replace or target.limits is None else target.limits.model_dump()
            current.update(values)
            try:
                entry = LimitsEntry.model_validate(current)
            except ValidationError as exc:
                first = exc.errors()[0]
                raise KeyActionRefused(
                    f"{first['loc'][0]}: a limit is a whole number of at least 1 or 'unlimited'"
                ) from exc
            target.limits = None if entry.overrides().empty else entry
            return user.model_copy(deep=True)

        return self._mutate(change)

    def _named_key(self, doc: UsersFile, selector: str, key: str) -> tuple[UserEntry, KeyEntry]:
        """The user an operator named and their one key named or prefixed ``key``."""
        user = doc.find(selector)
        if user is None:
            raise KeyActionRefused(f"no user {selector!r} in {self.path}")
        found = [k for k in user.keys if key in (k.name, k.prefix)]
        if len(found) != 1:
            raise KeyActionRefused(f"{selector} has no key named or prefixed {key!r}")
        return user, found[0]

    def revoke(self, selector: str, key: str) -> KeyEntry:
        """Remove one key, named by its name or its prefix."""

        def change(doc: UsersFile) -> KeyEntry:
            user, entry = self._named_key(doc, selector, key)
            user.keys.remove(entry)
            return entry

        return self._mutate(change)

    def set_scope(self, selector: str, key: str, ask: key_scope.ScopeAsk) -> KeyEntry:
        """An operator sets the models, expiry or label of any key (name or prefix); no
        allowance applies (an expiry may also be set in the past: the key is refused)."""
        now = self._clock()
        try:
            models = None if ask.models is None else parse_models(ask.models)
            expires = None
            if ask.expiry is not None:
                expires = key_scope.parse_expiry(ask.expiry, now)
            label = None if ask.label is None else key_scope.check_label(ask.label)
        except ScopeRefused as exc:
            raise KeyActionRefused(str(exc)) from None

        def change(doc: UsersFile) -> KeyEntry:
            _, entry = self._named_key(doc, selector, key)
            if ask.models is not None:
                entry.models = _listed(models)
            if ask.expiry is not None:
                entry.expires = _stamp(expires)
            if ask.label is not None:
                entry.label = label or None
            return entry.model_copy()

        return self._mutate(change)

    def set_group_defaults(
        self, group: str, models: str | None, lifetime: str | None, remove: bool = False
    ) -> list[GroupDefaults]:
        """Set (or with ``remove`` drop) the key defaults of a GitLab group."""
        group = group.strip().strip("/")
        try:
            entry = GroupDefaults(
                group=group,
                models=_listed(parse_models(models)) if models else None,
                lifetime=lifetime or None,
            )
        except (ScopeRefused, ValidationError) as exc:
            raise KeyActionRefused(_first_error(exc)) from None

        def change(doc: UsersFile) -> list[GroupDefaults]:
            rest = [d for d in doc.key_defaults if d.group.lower() != group.lower()]
            doc.key_defaults = rest if remove else [*rest, entry]
            return list(doc.key_defaults)

        return self._mutate(change)

    def flush_last_used(self) -> int:
        """Write the last-used times noted since the last flush, in one write."""
        pending, self._used = self._used, {}
        if not pending:
            return 0

        def change(doc: UsersFile) -> int:
            n = 0
            for user in doc.users:
                for key in user.keys:
                    ts = pending.get(key.sha256)
                    if ts is not None:
                        key.last_used = datetime.fromtimestamp(int(ts), UTC)
                        n += 1
            return n

        try:
            return self._mutate(change)
        except (OSError, ConfigError) as exc:
            for h, ts in pending.items():
                self._used.setdefault(h, ts)
            log.error("users_last_used_not_written", error=str(exc), keys=len(pending))
            return 0
