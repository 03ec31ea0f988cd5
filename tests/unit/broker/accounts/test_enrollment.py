"""The enrollment store and its rate window, with a fake clock: no sockets, no sleeping."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from broker.accounts import enrollment
from broker.accounts.enrollment import EnrollmentError, EnrollmentStore
from broker.accounts.keys import hash_secret
from broker.accounts.window import SlidingWindow
from shared.fingerprint import fingerprint
from shared.protocol import EnrollRequest, EnrollStatus


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ask(
    name: str = "gpu:llm", secret: str = "s" * 40, models: list[str] | None = None
) -> EnrollRequest:
    return EnrollRequest(name=name, models=models or ["m1"], secret=secret, version="0.1.0")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> EnrollmentStore:
    return EnrollmentStore(tmp_path / "enrolled.yaml", clock)


def test_window_allows_the_limit_then_says_how_long_to_wait() -> None:
    window = SlidingWindow(limit=2, window=10.0)
    assert window.allow("a", 0.0) == 0.0
    assert window.allow("a", 1.0) == 0.0
    assert window.allow("a", 2.0) == pytest.approx(8.0)
    assert window.allow("b", 2.0) == 0.0  # per key
    assert window.allow("a", 10.5) == 0.0  # the first event left the window


def test_window_forgets_idle_keys_instead_of_growing() -> None:
    window = SlidingWindow(limit=1, window=1.0, max_keys=3)
    for i in range(3):
        window.allow(f"k{i}", 0.0)
    assert window.allow("new", 0.5) == 1.0  # full of live keys: wait
    assert window.allow("new", 5.0) == 0.0  # the old ones are swept
    assert len(window._events) == 1


def test_a_pending_ask_is_stored_once_however_often_it_is_repeated(
    store: EnrollmentStore, tmp_path: Path
) -> None:
    first = store.ask(ask(), "10.0.0.5")
    assert first.status == 202 and first.reply.status is EnrollStatus.PENDING
    written = (tmp_path / "enrolled.yaml").stat().st_mtime_ns
    for _ in range(20):
        again = store.ask(ask(), "10.0.0.5")
        assert again.reply.enrollment_id == first.reply.enrollment_id
    assert (tmp_path / "enrolled.yaml").stat().st_mtime_ns == written  # nothing changed
    # The same name from the same address with a new secret is another entry (a racer, or
    # the connector lost its file): matched by the secret only, it never takes the first.
    other = store.ask(ask(secret="t" * 40), "10.0.0.5")
    assert other.reply.enrollment_id != first.reply.enrollment_id
    assert len(store.entries) == 2
    data = yaml.safe_load((tmp_path / "enrolled.yaml").read_text())
    entry, _ = data["connectors"]
    assert entry["name"] == "gpu:llm" and entry["address"] == "10.0.0.5"
    assert entry["secret_sha256"] == hash_secret("s" * 40)
    assert store.entries[0].fingerprint == fingerprint("s" * 40)
    assert "s" * 40 not in (tmp_path / "enrolled.yaml").read_text()
    assert stat.S_IMODE((tmp_path / "enrolled.yaml").stat().st_mode) == 0o600


def test_approval_delivers_a_token_exactly_once_and_the_keystore_sees_it(
    store: EnrollmentStore, tmp_path: Path
) -> None:
    entry_id = store.ask(ask(), "10.0.0.5").reply.enrollment_id
    store.approve(entry_id, "root")
    got = store.ask(ask(), "10.0.0.5")
    assert got.status == 200 and got.reply.token is not None
    token = got.reply.token
    ident = store.lookup(hash_secret(token))
    assert ident is not None and ident.id == entry_id
    assert token not in (tmp_path / "enrolled.yaml").read_text()
    # The secret is forgotten: asking again is a new request, never a second token.
    again = store.ask(ask(), "10.0.0.5")
    assert again.status == 202 and again.reply.token is None
    assert again.reply.enrollment_id != entry_id


def test_reject_and_revoke(store: EnrollmentStore) -> None:
    rejected = store.ask(ask("a"), "10.0.0.1").reply.enrollment_id
    store.reject(rejected, "root")
    verdict = store.ask(ask("a"), "10.0.0.1")
    assert verdict.status == 403 and verdict.reply.status is EnrollStatus.REJECTED

    kept = store.ask(ask("b", secret="b" * 40), "10.0.0.2").reply.enrollment_id
    store.approve(kept, "root")
    token = store.ask(ask("b", secret="b" * 40), "10.0.0.2").reply.token
    assert token is not None
    store.set_llm_key(kept, "sk-upstream")
    ident = store.lookup(hash_secret(token))
    assert ident is not None and ident.upstream_api_key == "sk-upstream"
    store.revoke(kept, "root")
    assert store.lookup(hash_secret(token)) is None
    with pytest.raises(EnrollmentError, match="revoked, not approved"):
        store.revoke(kept, "root")
    with pytest.raises(EnrollmentError) as info:
        store.approve("e-nothere", "root")
    assert info.value.status == 404


def test_bad_llm_key_is_refused(store: EnrollmentStore) -> None:
    entry_id = store.ask(ask(), None).reply.enrollment_id
    store.approve(entry_id, "root")
    with pytest.raises(EnrollmentError, match="one line"):
        store.set_llm_key(entry_id, "two words")


def test_pending_entries_and_asks_are_bounded(
    store: EnrollmentStore, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(enrollment, "MAX_PENDING", 3)
    for i in range(3):
        store.ask(ask(f"n{i}", secret=f"{i}" * 40), f"10.0.1.{i}")
    with pytest.raises(EnrollmentError) as full:
        store.ask(ask("n9", secret="9" * 40), "10.0.1.9")
    assert full.value.status == 503 and full.value.code == "enrollment_full"
    assert len(store.entries) == 3
    # One address cannot create more than NEW_PER_ADDRESS entries an hour.
    monkeypatch.setattr(enrollment, "MAX_PENDING", 1000)
    made = 0
    with pytest.raises(EnrollmentError) as slow:
        for i in range(100):
            store.ask(ask(f"x{i}", secret=f"x{i:02d}" * 12), "10.9.9.9")
            made += 1
    assert made == enrollment.NEW_PER_ADDRESS and slow.value.status == 429
    clock.now += 3601
    store.ask(ask("later", secret="L" * 40), "10.9.9.9")


def test_operator_edits_are_reloaded_and_a_broken_file_keeps_the_last_state(
    store: EnrollmentStore, tmp_path: Path
) -> None:
    entry_id = store.ask(ask(), None).reply.enrollment_id
    store.approve(entry_id, "root")
    token = store.ask(ask(), None).reply.token
    assert token is not None
    path = tmp_path / "enrolled.yaml"
    data = yaml.safe_load(path.read_text())
    data["connectors"][0]["llm_api_key"] = "sk-edited"
    path.write_text(yaml.safe_dump(data))
    assert store.reload()
    ident = store.lookup(hash_secret(token))
    assert ident is not None and ident.upstream_api_key == "sk-edited"
    path.write_text("connectors: [ {broken")
    assert not store.reload()
    assert store.error is not None and store.lookup(hash_secret(token)) is not None
