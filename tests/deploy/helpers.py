"""Helpers for the deployment tests: processes, file snapshots, talking to a broker.

Kept apart from tests/support on purpose: these tests drive installed programs as
separate processes (a wheel in a venv, a staged install), nothing in-process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic_settings import BaseSettings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SANDBOX = Path(__file__).with_name("sandbox.py")
SYSTEM_PYTHON = "/usr/bin/python3"
START_TIMEOUT = 20.0


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def entry_points() -> set[str]:
    return set(pyproject()["project"]["scripts"])


def env_names(cls: type[BaseSettings]) -> set[str]:
    prefix = str(cls.model_config.get("env_prefix", ""))
    return {prefix + name.upper() for name in cls.model_fields}


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = 120.0,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(c) for c in cmd],
        env=dict(env) if env is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{cmd[0]} exited {result.returncode}\n--- stdout\n{result.stdout}\n"
            f"--- stderr\n{result.stderr}"
        )
    return result


# --- long-running programs -------------------------------------------------------------


@dataclass
class Proc:
    """A program started in the background, its output going to files."""

    name: str
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path

    def output(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return int(self.popen.returncode)


def start(
    name: str, cmd: Sequence[str | os.PathLike[str]], logs: Path, env: Mapping[str, str]
) -> Proc:
    logs.mkdir(parents=True, exist_ok=True)
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    with out.open("wb") as fout, err.open("wb") as ferr:
        popen = subprocess.Popen(
            [str(c) for c in cmd],
            stdout=fout,
            stderr=ferr,
            stdin=subprocess.DEVNULL,
            env=dict(env),
        )
    return Proc(name, popen, out, err)


@contextlib.contextmanager
def running(procs: list[Proc]) -> Iterator[list[Proc]]:
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.stop()


def wait_for(
    what: str, check: Any, procs: Sequence[Proc] = (), timeout: float = START_TIMEOUT
) -> Any:
    """Poll ``check()`` until it returns something truthy; fail early if a process died."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.alive():
                raise AssertionError(
                    f"{proc.name} exited {proc.popen.returncode} while waiting for {what}:\n"
                    + proc.output()[-4000:]
                )
        try:
            result = check()
        except (httpx.HTTPError, OSError, ValueError) as exc:
            last_error, result = exc, None
        if result:
            return result
        time.sleep(0.1)
    logs = "\n".join(f"--- {p.name}\n{p.output()[-3000:]}" for p in procs)
    raise AssertionError(f"timed out waiting for {what} (last error: {last_error})\n{logs}")


def http_status(url: str, **kwargs: Any) -> int:
    return httpx.get(url, timeout=2.0, **kwargs).status_code


def base_env(**extra: str) -> dict[str, str]:
    """A clean environment for a program under test: no REMOTELLM_* leaking in."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(extra)
    return env


# --- files -----------------------------------------------------------------------------

BANNER_KEY = re.compile(r"API key for users:\s+(\S+)")
BANNER_TOKEN = re.compile(r"Connector token:\s+(\S+)")


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines the way systemd's EnvironmentFile= reads them (no expansion)."""
    env: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=value: {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def unit_settings(path: Path, section: str = "Service") -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    current = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section:
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def unit_environment(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in unit_settings(path).get("Environment", []):
        key, _, val = value.partition("=")
        env[key] = val
    return env


@dataclass(frozen=True)
class Entry:
    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    digest: str


def snapshot(root: Path) -> dict[str, Entry]:
    """Every file, dir and link under root with content hash, mode, owner and mtime."""
    result: dict[str, Entry] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            kind, digest = "link", os.readlink(path)
        elif stat.S_ISDIR(st.st_mode):
            kind, digest = "dir", ""
        else:
            kind, digest = "file", hashlib.sha256(path.read_bytes()).hexdigest()
        result[str(path.relative_to(root))] = Entry(
            kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, digest
        )
    return result


# --- talking to a broker ---------------------------------------------------------------


def models_ready(base_url: str, key: str, model: str, **kwargs: Any) -> bool:
    response = httpx.get(
        f"{base_url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=3, **kwargs
    )
    return response.status_code == 200 and any(
        m.get("id") == model for m in response.json().get("data", [])
    )


def chat(base_url: str, key: str, model: str, **kwargs: Any) -> str:
    response = httpx.post(
        f"{base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
        **kwargs,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def chat_stream(base_url: str, key: str, model: str, **kwargs: Any) -> tuple[str, list[float]]:
    """Stream a chat completion; return the text and when each content chunk arrived."""
    parts: list[str] = []
    arrivals: list[float] = []
    started = time.monotonic()
    with httpx.stream(
        "POST",
        f"{base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
        **kwargs,
    ) as response:
        assert response.status_code == 200, response.read().decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                parts.append(delta)
                arrivals.append(time.monotonic() - started)
    return "".join(parts), arrivals
