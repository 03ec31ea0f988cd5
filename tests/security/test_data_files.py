"""Data files: durable atomic writes, private modes, and a ledger that refused requests
cannot fill with their model names.

Attacks and accidents: a crash between rename and the data reaching the disk leaves an
empty users file that the next write takes as "no users"; other local users read the
ledger or the data dir; an API user sends a model name as long as the body limit on
every refused request and the ledger stores each one whole.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import httpx
import pytest

from broker.accounts.keys import KeyStore
from broker.accounts.users import UsersStore
from connector.enroll import write_private
from tests.support.procs import Procs
from tests.support.stack import USER_KEY


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The file descriptors os.fsync was called on (it still runs)."""
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_users_file_write_fsyncs_the_file_and_its_directory(
    tmp_path: Path, fsyncs: list[int]
) -> None:
    store = UsersStore(tmp_path / "users.yaml")
    store.login(1, "alice", "Alice")
    # The temp file's data before the rename, and the directory entry after it.
    assert len(fsyncs) >= 2
    assert mode(tmp_path / "users.yaml") == 0o600


@pytest.mark.parametrize(
    "write",
    [
        lambda d: KeyStore(
            static_user_keys=[], static_connector_tokens=[], connector_config=None, data_dir=d
        ).ensure_credentials(),
        lambda d: write_private(d / "credentials", "ct-" + "a" * 48),
    ],
    ids=["broker credentials", "connector token"],
)
def test_every_store_writes_durably_and_privately(
    tmp_path: Path, fsyncs: list[int], write: object
) -> None:
    data = tmp_path / "fresh" / "data"
    write(data)  # type: ignore[operator]
    assert len(fsyncs) >= 2
    assert mode(data) == 0o700
    for path in data.iterdir():
        assert mode(path) == 0o600, path


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = UsersStore(tmp_path / "users.yaml")
    store.login(1, "alice", "Alice")
    before = (tmp_path / "users.yaml").read_text()

    def crash(fd: int) -> None:
        raise OSError(5, "I/O error")  # the disk failed before the data was safe

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        store.login(2, "bob", "Bob")
    assert (tmp_path / "users.yaml").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".users.yaml.lock", "users.yaml"]


@pytest.mark.e2e
async def test_broker_data_is_private_and_ledger_cuts_refused_model_names(
    procs: Procs, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    broker = await procs.broker(data, "--user-api-key", USER_KEY, "--log-format", "json")
    long_model = "m" * 200_000
    async with httpx.AsyncClient(trust_env=False, timeout=30.0) as client:
        r = await client.post(
            f"{broker.url}/v1/chat/completions",
            json={"model": long_model, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {USER_KEY}"},
        )
    assert 400 <= r.status_code < 500
    assert broker.proc is not None
    broker.proc.signal()
    assert await broker.proc.wait_exit(30) == 0, broker.proc.tail()

    assert mode(data) == 0o700
    for path in data.iterdir():
        if path.is_file():
            assert mode(path) == 0o600, path
    with sqlite3.connect(data / "usage.sqlite3") as db:
        models = [row[0] for row in db.execute("SELECT model FROM usage")]
    assert models, "the refused request was not recorded"
    assert all(len(m) <= 256 for m in models), [len(m) for m in models]
