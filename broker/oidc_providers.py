"""The OpenID Connect providers of the key portal, from ``--oidc-providers-file``.

One YAML file declares every provider (``providers: [{name, issuer, client_id, ...}]``):
several providers each need the same half-dozen fields, which repeated flags cannot pair
up reliably. The client secret is never in the file or on the command line: it comes from
``client_secret_file`` (a path, e.g. a mounted secret) or ``client_secret_env`` (the name
of an environment variable), so neither ``ps`` nor a committed file shows it. A public
client (PKCE only) has neither.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from broker.accounts.identities import PROVIDER_NAME, RESERVED_NAMES
from shared.errors import ConfigError

CLAIM_PATH = re.compile(r"^[\w:/.-]{1,200}$")


class ProviderEntry(BaseModel):
    """One provider as written in the file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="In URLs and user IDs; never rename a provider in use.")
    issuer: str
    client_id: str = Field(min_length=1)
    client_secret_file: Path | None = None
    client_secret_env: str | None = None
    label: str = Field("", max_length=60)  # the button says "Log in with <label>"
    scopes: list[str] = Field(default_factory=lambda: ["openid", "email", "profile"])
    groups_claim: str = "groups"
    allowed_groups: list[str] = Field(default_factory=list)
    allow_any_user: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not PROVIDER_NAME.match(value) or value in RESERVED_NAMES:
            raise ValueError(
                "a provider name is 1 to 31 lowercase letters, digits or '-', starting with a "
                "letter, and not 'gitlab'"
            )
        return value

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/?#]+(/[^\s?#]*)?$", value):
            raise ValueError("the issuer is an http(s) URL without query or fragment")
        return value.rstrip("/")

    @field_validator("groups_claim")
    @classmethod
    def _claim(cls, value: str) -> str:
        if not CLAIM_PATH.match(value):
            raise ValueError("the groups claim is a claim name or a dotted path to one")
        return value

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: list[str]) -> list[str]:
        if any(not re.fullmatch(r"[\x21\x23-\x5b\x5d-\x7e]+", s) for s in value):
            raise ValueError("a scope is printable ASCII without spaces, quotes or backslashes")
        return value if "openid" in value else ["openid", *value]


class ProvidersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    providers: list[ProviderEntry] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class OidcProvider:
    """A provider ready to use: its entry's values and the secret, read once at start."""

    name: str
    label: str
    issuer: str
    client_id: str
    client_secret: str | None
    scopes: tuple[str, ...]
    groups_claim: str
    allowed_groups: tuple[str, ...]


def load_providers(path: Path) -> tuple[OidcProvider, ...]:
    """The file's providers with their secrets; ConfigError naming what is wrong."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        doc = ProvidersFile.model_validate(data)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--oidc-providers-file {path}: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"--oidc-providers-file {path}: {where}: {first['msg']}") from exc
    names = [p.name for p in doc.providers]
    if len(set(names)) != len(names):
        raise ConfigError(f"--oidc-providers-file {path}: two providers share a name")
    return tuple(_ready(path, entry) for entry in doc.providers)


def _ready(path: Path, entry: ProviderEntry) -> OidcProvider:
    where = f"--oidc-providers-file {path}: provider {entry.name}"
    if not entry.allowed_groups and not entry.allow_any_user:
        raise ConfigError(
            f"{where} would give an API key to every account of {entry.issuer}: name "
            "allowed_groups, or say that anyone may with allow_any_user: true"
        )
    return OidcProvider(
        name=entry.name,
        label=entry.label or entry.name,
        issuer=entry.issuer,
        client_id=entry.client_id,
        client_secret=_secret(where, entry),
        scopes=tuple(entry.scopes),
        groups_claim=entry.groups_claim,
        allowed_groups=tuple(entry.allowed_groups),
    )


def _secret(where: str, entry: ProviderEntry) -> str | None:
    if entry.client_secret_file is not None and entry.client_secret_env:
        raise ConfigError(f"{where}: give client_secret_file or client_secret_env, not both")
    if entry.client_secret_env:
        value = os.environ.get(entry.client_secret_env, "").strip()
        if not value:
            raise ConfigError(f"{where}: the variable {entry.client_secret_env} is not set")
        return value
    if entry.client_secret_file is not None:
        try:
            value = entry.client_secret_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{where}: client_secret_file: {exc}") from exc
        if not value:
            raise ConfigError(f"{where}: {entry.client_secret_file} is empty")
        return value
    return None
