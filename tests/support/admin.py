"""The admin API's test helpers: seed users, create tokens with the real CLI, call it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx

from broker.accounts.users import UsersStore
from tests.support.procs import child_env


def seed_users(path: Path, *names: tuple[int, str]) -> UsersStore:
    """A users file with these (GitLab ID, username) users, each with a first key."""
    store = UsersStore(path)
    for gitlab_id, username in names:
        store.login(gitlab_id, username, username.title())
    return store


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``remotellm-broker --data-dir DATA_DIR ARGS`` as a process."""
    return subprocess.run(
        [sys.executable, "-m", "broker", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        check=False,
    )


async def create_token(data_dir: Path, scope: str, label: str = "test") -> str:
    """An admin token made by ``remotellm-broker admin-tokens create``: its secret."""
    done = await asyncio.to_thread(
        cli, data_dir, "admin-tokens", "create", "--scope", scope, "--label", label
    )
    assert done.returncode == 0, done.stderr
    secret = done.stdout.strip().splitlines()[-1]
    assert secret.startswith("rla-")
    return secret


def admin_client(base_url: str, token: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(
        base_url=base_url + "/admin/v1", headers=headers, timeout=15, trust_env=False
    )
