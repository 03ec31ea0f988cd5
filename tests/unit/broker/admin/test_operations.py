"""The operations layer: each change made through the store and audited without secrets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.accounts.admin_tokens import AdminTokenRefused
from broker.accounts.users import KeyActionRefused, UsersStore
from broker.admin.operations import Actor, Operations, build_operations
from broker.usage.audit import AuditFilter, entries

BY = Actor("cli:tester", None)


def _ops(tmp_path: Path) -> Operations:
    users = UsersStore(tmp_path / "users.yaml")
    users.login(42, "alice", "Alice")
    return build_operations(users, None, tmp_path / "usage.sqlite3", tmp_path / "tokens.yaml")


def _audit(tmp_path: Path) -> list[tuple[str, str, dict[str, object]]]:
    found = entries(tmp_path / "usage.sqlite3", AuditFilter())
    return [(e.action, e.target, e.details) for e in found]


def test_changes_are_audited_by_username_with_prefixes_only(tmp_path: Path) -> None:
    ops = _ops(tmp_path)
    key = ops.users.users[0].keys[0]
    ops.set_blocked(BY, "42", True)
    ops.set_limits(BY, "alice", {"rpm": 5})
    ops.revoke_key(BY, "42", key.prefix)
    assert _audit(tmp_path) == [
        ("user.block", "alice", {"gitlab_id": 42}),
        ("limits.set", "alice", {"key": None, "replace": False, "limits": {"rpm": 5}}),
        ("key.revoke", "alice", {"key": "default", "prefix": key.prefix}),
    ]
    assert key.sha256 not in (tmp_path / "usage.sqlite3").read_bytes().decode("latin-1")


def test_a_refused_change_is_not_audited(tmp_path: Path) -> None:
    ops = _ops(tmp_path)
    with pytest.raises(KeyActionRefused):
        ops.set_blocked(BY, "nobody", True)
    with pytest.raises(AdminTokenRefused):
        ops.create_admin_token(BY, "read", "bad\nlabel")
    assert not (tmp_path / "usage.sqlite3").exists() or _audit(tmp_path) == []


def test_admin_tokens_are_hashed_and_their_audit_names_the_id(tmp_path: Path) -> None:
    ops = _ops(tmp_path)
    secret, token = ops.create_admin_token(BY, "read", "grafana")
    assert secret not in (tmp_path / "tokens.yaml").read_text()
    assert ops.tokens.lookup(secret) == token
    ops.revoke_admin_token(BY, token.id)
    assert ops.tokens.lookup(secret) is None
    assert [a[:2] for a in _audit(tmp_path)] == [
        ("admin_token.create", token.id),
        ("admin_token.revoke", token.id),
    ]
    assert secret not in json.dumps(_audit(tmp_path))


def test_an_unwritable_audit_log_is_logged_and_the_change_stands(tmp_path: Path) -> None:
    ops = _ops(tmp_path)
    (tmp_path / "usage.sqlite3").mkdir()  # SQLite cannot open a directory
    ops.set_blocked(BY, "alice", True)
    assert ops.users.users[0].blocked
