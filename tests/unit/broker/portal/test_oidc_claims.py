"""Who an OIDC login is: the ID per (provider, sub), the groups at a claim path."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.accounts.identities import IdentityClash, is_oidc_user_id, oidc_user_id
from broker.accounts.users import UsersStore
from broker.portal.oidc import UsedOnce, groups_of


def test_ids_never_meet_gitlab_ids_or_each_other() -> None:
    ids = {oidc_user_id(p, s) for p in ("acme", "other") for s in ("1", "2", "10", "u-7f3a")}
    assert len(ids) == 8 and all(is_oidc_user_id(i) for i in ids)
    assert oidc_user_id("acme", "1") == oidc_user_id("acme", "1")  # stable across restarts
    assert not is_oidc_user_id(1001)


@pytest.mark.parametrize(
    ("claims", "path", "groups"),
    [
        ({"groups": ["a", "b"]}, "groups", ("a", "b")),
        ({"roles": "admin"}, "roles", ("admin",)),
        ({"realm_access": {"roles": ["gpu"]}}, "realm_access.roles", ("gpu",)),
        ({"https://example.org/groups": ["x"]}, "https://example.org/groups", ("x",)),
        ({"realm_access": "oops"}, "realm_access.roles", ()),
        ({}, "groups", ()),
        ({"groups": [{"nested": 1}, "ok"]}, "groups", ("ok",)),
    ],
)
def test_groups_at_a_claim_path(claims: dict[str, object], path: str, groups: tuple[str]) -> None:
    assert groups_of(claims, path) == groups


def test_a_state_is_used_once_until_it_would_have_expired() -> None:
    now = [0.0]
    used = UsedOnce(lambda: now[0])
    assert used.first_use("s") and not used.first_use("s")
    now[0] = 601.0
    assert used.first_use("s")  # forgotten: its flow cookie has expired by now


def test_the_users_file_keeps_the_identity_and_refuses_a_clash(tmp_path: Path) -> None:
    store = UsersStore(tmp_path / "users.yaml")
    uid = oidc_user_id("acme", "u1")
    result = store.login(uid, "bob", "Bob", ("acme", "u1"))
    assert result.first_key is not None and result.user.user_id == f"acme-{-uid}"
    assert store.login(uid, "bobby", "Bob", ("acme", "u1")).first_key is None
    with pytest.raises(IdentityClash):
        store.login(uid, "mallory", "M", ("acme", "u2"))
    store.login(1001, "alice", "Alice")
    text = (tmp_path / "users.yaml").read_text(encoding="utf-8")
    assert text.count("provider:") == 1 and "subject: u1" in text  # GitLab users unchanged
