"""Scoped and expiring keys: the pure rules and the users store, with a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from broker.accounts import key_scope
from broker.accounts.key_scope import (
    Allowance,
    GroupRule,
    ScopeAsk,
    ScopeRefused,
    allowance_for,
    allows,
    expired,
    parse_duration,
    parse_expiry,
    parse_models,
    renewed_expiry,
    user_scope,
)
from broker.accounts.keys import hash_secret
from broker.accounts.users import KeyActionRefused, UsersStore

NOW = 1_800_000_000.0
DAY = 86400.0


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_expiry_is_exact_at_the_second() -> None:
    assert not expired(None, NOW)
    assert not expired(NOW + 60, NOW + 59.999)
    assert expired(NOW + 60, NOW + 60)
    assert expired(NOW + 60, NOW + 3600)


def test_scope_allows_only_its_models() -> None:
    assert allows(None, "anything")
    assert allows(frozenset({"qwen", "fast"}), "fast")
    assert not allows(frozenset({"qwen"}), "llama")
    assert not allows(frozenset(), "qwen")


@pytest.mark.parametrize(
    ("text", "seconds"), [("90m", 5400), ("12h", 43200), ("30d", 30 * DAY), ("2w", 14 * DAY)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "0d", "1y", "-1d", "1.5d", "1 d", "d", "99999999d", "1d\x00", "never!", "1e3m"]
)
def test_bad_durations_are_refused_with_what_to_write(text: str) -> None:
    with pytest.raises(ScopeRefused, match="90m, 12h, 30d, 2w"):
        parse_duration(text)


def test_expiry_from_a_lifetime_a_date_or_never() -> None:
    assert parse_expiry("1m", NOW) == NOW + 60
    assert parse_expiry("never", NOW) is None
    assert parse_expiry("2027-01-31", NOW) == 1801353600.0
    assert parse_expiry("2027-01-31T18:00", NOW) == 1801353600.0 + 18 * 3600
    with pytest.raises(ScopeRefused, match="real date"):
        parse_expiry("2027-02-31", NOW)
    with pytest.raises(ScopeRefused):
        parse_expiry("2027-01-31 18:00", NOW)


def test_model_lists_are_checked_names() -> None:
    assert parse_models("qwen, fast  llama") == frozenset({"qwen", "fast", "llama"})
    assert parse_models("") is None
    assert parse_models("*") is None
    with pytest.raises(ScopeRefused, match="commas"):
        parse_models("qwen, <script>")
    with pytest.raises(ScopeRefused, match="at most"):
        parse_models(",".join(f"m{i}" for i in range(60)))


def test_label_rejects_control_characters_and_length() -> None:
    assert key_scope.check_label("  CI runner ") == "CI runner"
    with pytest.raises(ScopeRefused):
        key_scope.check_label("a\x1b[31mred")
    with pytest.raises(ScopeRefused):
        key_scope.check_label("x" * 81)


def test_allowance_is_the_union_of_the_users_groups() -> None:
    rules = [
        GroupRule("org/guests", frozenset({"small"}), 7 * DAY),
        GroupRule("org/ml", frozenset({"big", "fast"}), 30 * DAY),
        GroupRule("org/admins", None, None),
    ]
    guest = allowance_for(["Org/Guests/"], rules, None)
    assert guest == Allowance(frozenset({"small"}), 7 * DAY, None)
    both = allowance_for(["org/guests", "org/ml"], rules, 10 * DAY)
    assert both == Allowance(frozenset({"small", "big", "fast"}), 7 * DAY, 10 * DAY)
    assert allowance_for(["org/admins", "org/ml"], rules, None).models is None
    assert allowance_for(["elsewhere"], rules, 5 * DAY) == Allowance(None, 5 * DAY, 5 * DAY)


def test_a_user_cannot_widen_beyond_the_allowance_or_the_cap() -> None:
    allowance = Allowance(frozenset({"small"}), None, 30 * DAY)
    assert user_scope(allowance, None, NOW + DAY, NOW) == (frozenset({"small"}), NOW + DAY)
    with pytest.raises(ScopeRefused, match="may not use big"):
        user_scope(allowance, frozenset({"small", "big"}), NOW + DAY, NOW)
    with pytest.raises(ScopeRefused, match="must expire"):
        user_scope(allowance, None, None, NOW)
    with pytest.raises(ScopeRefused, match="at most 30d"):
        user_scope(allowance, None, NOW + 31 * DAY, NOW)
    with pytest.raises(ScopeRefused, match="past"):
        user_scope(Allowance(), None, NOW - 1, NOW)


def test_a_renewed_key_lives_as_long_again_but_never_beyond_the_cap() -> None:
    capped = Allowance(max_lifetime=7 * DAY, lifetime=7 * DAY)
    assert renewed_expiry(Allowance(), NOW - DAY, NOW - 60, NOW) == NOW + DAY - 60
    assert renewed_expiry(Allowance(), NOW - DAY, None, NOW) is None
    assert renewed_expiry(capped, NOW - 90 * DAY, NOW - 30 * DAY, NOW) == NOW + 7 * DAY
    assert renewed_expiry(capped, NOW - DAY, None, NOW) == NOW + 7 * DAY


# -- the users store ------------------------------------------------------------------------


def _store(tmp_path: Path, clock: FakeClock, cap: float | None = None) -> UsersStore:
    return UsersStore(tmp_path / "users.yaml", clock=clock, max_key_lifetime=cap)


def test_a_file_without_scopes_still_loads_and_its_keys_are_unscoped(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    digest = hash_secret("sk-" + "a" * 32)
    old = {
        "users": [
            {
                "gitlab_id": 7,
                "username": "alice",
                "keys": [{"name": "k", "prefix": "sk-aaaaaa", "sha256": digest, "created": NOW}],
            }
        ]
    }
    path.write_text(yaml.safe_dump(old))
    users = UsersStore(path, clock=FakeClock())
    assert users.error is None
    found = users.lookup(digest)
    assert found is not None and found.models is None and found.expires is None


def test_store_scopes_expires_and_regenerates_within_bounds(tmp_path: Path) -> None:
    clock = FakeClock()
    users = _store(tmp_path, clock, cap=7 * DAY)
    first = users.login(7, "alice", "Alice")
    assert first.first_key is not None
    entry = users.user(7).keys[0]  # type: ignore[union-attr]
    assert entry.expires is not None and entry.expires.timestamp() == NOW + 7 * DAY
    secret = users.create_key(7, "ci", ScopeAsk(models="qwen", expiry="1m", label="CI"))
    key = users.lookup(hash_secret(secret))
    assert key is not None and key.models == frozenset({"qwen"}) and key.expires == NOW + 60
    with pytest.raises(KeyActionRefused, match="must expire"):
        users.scope_key(7, "ci", ScopeAsk(expiry="never"))
    clock.now += 61
    with pytest.raises(KeyActionRefused, match="expired"):
        users.scope_key(7, "ci", ScopeAsk(expiry="7d"))
    again = users.regenerate_key(7, "ci")
    renewed = users.lookup(hash_secret(again))
    assert renewed is not None and renewed.models == frozenset({"qwen"})
    assert renewed.expires == clock.now + 60
    assert users.lookup(hash_secret(secret)) is None


def test_group_defaults_bound_new_keys(tmp_path: Path) -> None:
    clock = FakeClock()
    users = _store(tmp_path, clock)
    users.set_group_defaults("org/guests", "small,fast", "1d")
    users.login(9, "guest", "Guest", groups=("org/guests",))
    first = users.user(9).keys[0]  # type: ignore[union-attr]
    assert first.models == ["fast", "small"]
    assert first.expires is not None and first.expires.timestamp() == NOW + DAY
    with pytest.raises(KeyActionRefused, match="may not use big"):
        users.create_key(9, "wide", ScopeAsk(models="big"))
    operator = users.set_scope("guest", "default", ScopeAsk(models="big", expiry="never"))
    assert operator.models == ["big"] and operator.expires is None
    with pytest.raises(KeyActionRefused, match="lifetime"):
        users.set_group_defaults("org/x", None, "forever")
