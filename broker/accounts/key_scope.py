"""Scoped and expiring keys: the pure rules (no I/O, the clock is an argument).

A key may carry the models (and aliases) it may use (``None``: every model), an expiry
time (``None``: never) and a label. The operator bounds what users may give their own
keys: per GitLab group, ``key_defaults`` in the users file name the models a member's
keys may use and their default lifetime; ``--max-key-lifetime`` caps every key a user
creates, scopes or regenerates. Operators (``remotellm-broker users scope``, the admin
users page) may set any scope on any key.

Everything a user types is checked here, strictly: model names by ``shared.model_names``,
lifetimes as ``<number><m|h|d|w>`` or ``never``, dates as ``YYYY-MM-DD[THH:MM]`` (UTC).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from shared.model_names import InvalidModelName, check_model_names

MAX_SCOPE_MODELS = 50
MAX_LABEL = 80
NEVER = "never"
_DURATION = re.compile(r"(\d{1,6})([mhdw])")
_UNIT = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}(T\d{2}:\d{2})?Z?")
_LABEL = re.compile(r"[^\x00-\x1f\x7f]*")


class ScopeRefused(ValueError):
    """A scope, lifetime or label that cannot be used (the message says what to do)."""


@dataclass(frozen=True, slots=True)
class Allowance:
    """What a user may give their own keys.

    ``models``: the names their keys may use (None: any); ``lifetime``: the default
    lifetime of a new key in seconds (None: no expiry); ``max_lifetime``: the longest a
    key may live (None: no cap)."""

    models: frozenset[str] | None = None
    lifetime: float | None = None
    max_lifetime: float | None = None


@dataclass(frozen=True, slots=True)
class GroupRule:
    """One group's defaults (the users file's ``key_defaults``)."""

    group: str
    models: frozenset[str] | None
    lifetime: float | None


# -- the request path -------------------------------------------------------------------


def expired(expires: float | None, now: float) -> bool:
    """Has a key with this expiry (epoch seconds, None: never) expired at ``now``?"""
    return expires is not None and now >= expires


def allows(models: frozenset[str] | None, model: str) -> bool:
    """May a key scoped to ``models`` (None: every model) use ``model``?"""
    return models is None or model in models


# -- parsing what people type -----------------------------------------------------------


def parse_duration(text: str) -> float | None:
    """``90m``, ``12h``, ``30d``, ``2w`` in seconds; ``never`` is None. Anything else refused."""
    text = text.strip().lower()
    if text == NEVER:
        return None
    found = _DURATION.fullmatch(text)
    if found is None or int(found.group(1)) == 0:
        raise ScopeRefused(
            f"{text[:40]!r} is not a lifetime: write a number and a unit (90m, 12h, 30d, 2w) "
            "or 'never'"
        )
    return float(int(found.group(1)) * _UNIT[found.group(2)])


def parse_expiry(text: str, now: float) -> float | None:
    """An expiry typed as a lifetime from ``now`` (``30d``) or a UTC date or date-time
    (``2027-01-31``, ``2027-01-31T18:00``); ``never`` is None."""
    text = text.strip()
    if _DATE.fullmatch(text):
        fmt = "%Y-%m-%dT%H:%M" if "T" in text else "%Y-%m-%d"
        try:
            when = datetime.strptime(text.rstrip("Z"), fmt).replace(tzinfo=UTC)
        except ValueError:
            raise ScopeRefused(f"{text!r} is not a real date (YYYY-MM-DD[THH:MM], UTC)") from None
        return when.timestamp()
    lifetime = parse_duration(text)
    return None if lifetime is None else now + lifetime


def parse_models(text: str | Iterable[str]) -> frozenset[str] | None:
    """A model list (comma or whitespace separated, or a list); empty or ``*`` is None."""
    names = re.split(r"[\s,]+", text) if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    if not names or names == ["*"]:
        return None
    if len(names) > MAX_SCOPE_MODELS:
        raise ScopeRefused(f"A key may name at most {MAX_SCOPE_MODELS} models.")
    try:
        return frozenset(check_model_names(names))
    except InvalidModelName as exc:
        raise ScopeRefused(f"{exc}; list model names separated by commas") from None


def check_label(text: str) -> str:
    text = text.strip()
    if len(text) > MAX_LABEL or not _LABEL.fullmatch(text):
        raise ScopeRefused(f"A label is at most {MAX_LABEL} printable characters.")
    return text


# -- what the operator allows -----------------------------------------------------------


def allowance_for(
    groups: Iterable[str], rules: Iterable[GroupRule], max_lifetime: float | None
) -> Allowance:
    """The union of the rules of the user's groups; a user in no ruled group may use any
    model. The default lifetime is the shortest of their groups' (then capped)."""
    mine = {g.strip("/").lower() for g in groups}
    matched = [r for r in rules if r.group.strip("/").lower() in mine]
    models: frozenset[str] | None = None
    if matched and all(r.models is not None for r in matched):
        models = frozenset().union(*(r.models or frozenset() for r in matched))
    lifetimes = [r.lifetime for r in matched if r.lifetime is not None]
    lifetime = min(lifetimes) if lifetimes else None
    if max_lifetime is not None:
        lifetime = max_lifetime if lifetime is None else min(lifetime, max_lifetime)
    return Allowance(models=models, lifetime=lifetime, max_lifetime=max_lifetime)


def user_scope(
    allowance: Allowance,
    models: frozenset[str] | None,
    expires: float | None,
    now: float,
) -> tuple[frozenset[str] | None, float | None]:
    """Check a scope a user asks for against their allowance: the (models, expiry) to
    store, or ``ScopeRefused`` saying what they may ask for instead."""
    if allowance.models is not None:
        if models is None:
            models = allowance.models  # "all" means all that they may use
        wider = sorted(models - allowance.models)
        if wider:
            raise ScopeRefused(
                f"Your keys may not use {', '.join(wider[:5])}: pick among "
                f"{', '.join(sorted(allowance.models)) or 'no models'}, or ask an operator."
            )
    cap = allowance.max_lifetime
    if cap is not None:
        if expires is None:
            raise ScopeRefused(
                f"Keys here must expire: pick a lifetime of at most {shown_lifetime(cap)}."
            )
        if expires - now > cap:
            raise ScopeRefused(
                f"Keys here live at most {shown_lifetime(cap)}: pick a shorter lifetime."
            )
    if expires is not None and expires <= now:
        raise ScopeRefused("That expiry is in the past: pick a lifetime or a later date.")
    return models, expires


def default_expiry(allowance: Allowance, now: float) -> float | None:
    return None if allowance.lifetime is None else now + allowance.lifetime


def renewed_expiry(
    allowance: Allowance, created: float, expires: float | None, now: float
) -> float | None:
    """A regenerated key's expiry: the old key's lifetime again from ``now``, capped by the
    maximum lifetime (an expired key never comes back as one that outlives the cap)."""
    if expires is None:
        return default_expiry(allowance, now) if allowance.max_lifetime is not None else None
    lifetime = max(60.0, expires - created)
    if allowance.max_lifetime is not None:
        lifetime = min(lifetime, allowance.max_lifetime)
    return now + lifetime


def shown_lifetime(seconds: float) -> str:
    for unit, size in (("w", _UNIT["w"]), ("d", _UNIT["d"]), ("h", _UNIT["h"])):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds // 60)}m"


@dataclass(frozen=True, slots=True)
class ScopeAsk:
    """A scope as typed (portal form, CLI, admin page); None leaves that part as it is
    (for a new key: the operator's defaults)."""

    models: str | None = None
    expiry: str | None = None
    label: str | None = None
