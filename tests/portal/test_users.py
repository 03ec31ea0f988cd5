"""The users file: hashes only, atomic 600 writes, reload on change, broken file survived."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from broker.accounts.keys import KeyStore, hash_secret
from broker.accounts.users import KeyActionRefused, UsersFileError, UsersStore, parse_users
from broker.cli import main as broker_cli
from shared.errors import ConfigError

pytestmark = pytest.mark.usefixtures("clean_env")


def store(tmp_path: Path, clock: float = 1_800_000_000.0) -> UsersStore:
    return UsersStore(tmp_path / "users.yaml", clock=lambda: clock)


def bump(path: Path) -> None:
    """Make sure a rewrite gets a new stamp even within one mtime tick."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_first_login_creates_one_key_and_the_file_holds_only_its_hash(tmp_path: Path) -> None:
    users = store(tmp_path)
    first = users.login(7, "alice", "Alice")
    again = users.login(7, "alice", "Alice B.")
    assert first.first_key is not None and first.first_key.startswith("sk-")
    assert len(first.first_key) == 35
    assert again.first_key is None
    text = users.path.read_text()
    assert first.first_key not in text
    assert first.first_key[3:] not in text
    assert hash_secret(first.first_key) in text
    assert stat.S_IMODE(users.path.stat().st_mode) == 0o600
    entry = yaml.safe_load(text)["users"][0]
    assert entry["username"] == "alice" and entry["name"] == "Alice B."
    assert entry["keys"][0]["prefix"] == first.first_key[:9]
    found = users.lookup(hash_secret(first.first_key))
    assert found is not None and found.id == "gitlab-7" and found.name == "default"


def test_named_keys_regenerate_and_delete(tmp_path: Path) -> None:
    users = store(tmp_path)
    users.login(7, "alice", "Alice")
    laptop = users.create_key(7, "laptop")
    with pytest.raises(KeyActionRefused, match="already have a key named"):
        users.create_key(7, "laptop")
    with pytest.raises(KeyActionRefused, match="key name"):
        users.create_key(7, "<script>")
    fresh = users.regenerate_key(7, "laptop")
    assert users.lookup(hash_secret(laptop)) is None
    assert users.lookup(hash_secret(fresh)) is not None
    users.delete_key(7, "laptop")
    assert users.lookup(hash_secret(fresh)) is None
    with pytest.raises(KeyActionRefused, match="no key named"):
        users.delete_key(7, "laptop")


def test_blocked_user_keys_are_marked_blocked_and_cannot_change(tmp_path: Path) -> None:
    users = store(tmp_path)
    key = users.login(7, "alice", "Alice").first_key
    assert key
    users.set_blocked("alice", True)
    found = users.lookup(hash_secret(key))
    assert found is not None and found.blocked
    with pytest.raises(KeyActionRefused, match="blocked"):
        users.create_key(7, "more")
    users.set_blocked("7", False)
    found = users.lookup(hash_secret(key))
    assert found is not None and not found.blocked


def test_an_operator_edit_is_picked_up_and_a_broken_file_keeps_the_last_state(
    tmp_path: Path,
) -> None:
    users = store(tmp_path)
    key = users.login(7, "alice", "Alice").first_key
    assert key
    data = yaml.safe_load(users.path.read_text())
    data["users"][0]["blocked"] = True
    users.path.write_text(yaml.safe_dump(data))
    bump(users.path)
    assert users.reload()
    assert users.lookup(hash_secret(key)).blocked  # type: ignore[union-attr]
    users.path.write_text("users: [ {gitlab_id: 7, username: alice\n")  # broken YAML
    bump(users.path)
    assert not users.reload()
    assert users.error is not None and "not valid YAML" in users.error
    assert users.lookup(hash_secret(key)) is not None  # still serving the last good state
    with pytest.raises(UsersFileError):
        users.create_key(7, "x")  # never overwrite the operator's broken edit
    assert users.path.read_text().startswith("users: [ {gitlab_id")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("users: 3", "users"),
        ("users: [{gitlab_id: x, username: a}]", "gitlab_id"),
        (
            "users: [{gitlab_id: 1, username: a, keys: [{name: k, prefix: sk-1,"
            " sha256: sk-1234, created: 2026-01-01T00:00:00Z}]}]",
            "never a plain key",
        ),
        ("users: [{gitlab_id: 1, username: a, key: sk-123}]", "key"),
    ],
)
def test_malformed_files_are_reported_clearly(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(UsersFileError, match=words):
        parse_users(text, tmp_path / "users.yaml")


def test_writes_merge_with_an_edit_made_meanwhile(tmp_path: Path) -> None:
    users = store(tmp_path)
    users.login(7, "alice", "Alice")
    other = UsersStore(users.path)  # the operator's CLI, another process
    other.set_blocked("alice", True)
    bump(users.path)
    users.login(8, "bob", "Bob")  # the broker writes without a reload in between
    doc = parse_users(users.path.read_text(), users.path)
    assert [u.username for u in doc.users] == ["alice", "bob"]
    assert doc.users[0].blocked


def test_last_used_is_noted_in_memory_and_written_in_one_batch(tmp_path: Path) -> None:
    users = store(tmp_path, clock=1_800_000_000.0)
    key = users.login(7, "alice", "Alice").first_key
    assert key
    before = users.path.stat().st_mtime_ns
    for _ in range(100):
        users.lookup(hash_secret(key))
    assert users.path.stat().st_mtime_ns == before  # nothing written on the hot path
    entry = users.user(7).keys[0]  # type: ignore[union-attr]
    assert users.last_used(entry) is not None  # the page sees it before the flush
    assert users.flush_last_used() == 1
    assert users.flush_last_used() == 0
    stored = yaml.safe_load(users.path.read_text())["users"][0]["keys"][0]["last_used"]
    assert str(stored).startswith("2027-01-15")


def test_keystore_asks_the_users_file_after_static_keys(tmp_path: Path) -> None:
    users = store(tmp_path)
    portal_key = users.login(7, "alice", "Alice").first_key
    assert portal_key
    static = "sk-" + "2" * 32
    keys = KeyStore(
        static_user_keys=[static],
        static_connector_tokens=["ct-x"],
        connector_config=None,
        data_dir=tmp_path,
    )
    assert keys.user(portal_key) is None
    keys.attach_users(users.lookup)
    assert keys.user(static) is not None and keys.user(static).id.startswith("u-")  # type: ignore[union-attr]
    assert keys.user(portal_key).id == "gitlab-7"  # type: ignore[union-attr]
    assert keys.user("sk-" + "3" * 32) is None


def test_users_cli_lists_blocks_and_revokes(tmp_path: Path) -> None:
    users = store(tmp_path)
    users.login(7, "alice", "Alice")
    laptop = users.create_key(7, "laptop")
    base = ["--data-dir", str(tmp_path), "--users-file", str(users.path)]
    run = CliRunner().invoke

    listed = run(broker_cli.main, [*base, "users", "list"], catch_exceptions=False)
    assert listed.exit_code == 0, listed.output
    assert "alice" in listed.output and "1 users" in listed.output
    keys = run(broker_cli.main, [*base, "users", "keys", "alice"], catch_exceptions=False)
    assert "laptop" in keys.output and laptop[:9] in keys.output and laptop not in keys.output
    blocked = run(broker_cli.main, [*base, "users", "block", "alice"], catch_exceptions=False)
    assert blocked.exit_code == 0 and "blocked alice" in blocked.output
    users.reload()
    assert users.lookup(hash_secret(laptop)).blocked  # type: ignore[union-attr]
    revoked = run(
        broker_cli.main, [*base, "users", "revoke", "alice", laptop[:9]], catch_exceptions=False
    )
    assert revoked.exit_code == 0, revoked.output
    users.reload()
    assert users.lookup(hash_secret(laptop)) is None
    missing = run(broker_cli.main, [*base, "users", "block", "nobody"])
    assert missing.exit_code == 1 and "no user 'nobody'" in missing.stderr
    users.path.write_text("users: {")
    broken = run(broker_cli.main, [*base, "users", "list"])
    assert broken.exit_code == 1 and "not valid YAML" in broken.stderr


def test_with_the_portal_on_no_user_key_is_needed_to_start(tmp_path: Path) -> None:
    from broker.settings import BrokerSettings

    settings = BrokerSettings(
        data_dir=tmp_path,
        connector_tokens=["ct-x"],
        gitlab_client_id="app",
        gitlab_allow_any_user=True,
        generate_credentials=False,
    )
    _, creds = broker_cli.prepare(settings)
    assert creds.user_key is None and creds.connector_token is None
    with pytest.raises(ConfigError, match="--user-api-key"):
        broker_cli.prepare(
            BrokerSettings(data_dir=tmp_path, connector_tokens=["ct-x"], generate_credentials=False)
        )


def test_a_reload_racing_the_first_login_does_not_lose_the_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """reload() read "no file yet", a login wrote the file, then reload installed the empty
    state: the new user vanished until the next reload (a portal page redirected to login)."""
    import threading

    import broker.accounts.store as store_module

    store = UsersStore(tmp_path / "users.yaml")
    real_stamp = store_module.file_stamp
    login = threading.Thread(target=store.login, args=(7, "eve", "Eve"))
    calls = 0

    def stamp_then_login(path: Path):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        seen = real_stamp(path)
        if calls == 1:  # inside reload, after it looked at the file
            login.start()
            login.join(timeout=0.5)  # a writer that does not wait for the reload finishes here
        return seen

    monkeypatch.setattr(store_module, "file_stamp", stamp_then_login)
    store.reload()
    login.join(timeout=10)
    assert not login.is_alive()
    assert store.user(7) is not None  # in memory at once, not only after the next reload
