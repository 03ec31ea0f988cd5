"""Real broker and connector processes for the e2e, security, portal and scale-out tests.

``Proc`` runs ``sys.executable -m <module> ...`` as an asyncio subprocess, keeps every line
it prints (stdout and stderr, in order) and lets a test wait for a line, signal it and read
its exit code. ``Procs`` owns the processes of one test and kills what is left at teardown.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

from shared.bench.procs import cpu_seconds
from tests.support.net import free_ports

REPO_ROOT = Path(__file__).resolve().parents[2]
# ``--server NAME`` for every broker ``Procs.broker`` starts in a test that runs on both
# HTTP servers (tests/conftest.py fills it), else empty: the default server.
BROKER_SERVER: list[str] = []


def child_env() -> dict[str, str]:
    """The test's environment without RemoteLLM settings (each test says what it wants)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMOTELLM_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


@dataclass
class Line:
    stream: str
    text: str


@dataclass
class Proc:
    name: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)  # on top of child_env()
    lines: list[Line] = field(default_factory=list)
    process: asyncio.subprocess.Process | None = None
    _readers: list[asyncio.Task[None]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> Proc:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            *self.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO_ROOT,
            env=child_env() | self.env,
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self._readers = [
            asyncio.create_task(self._read("stdout", self.process.stdout)),
            asyncio.create_task(self._read("stderr", self.process.stderr)),
        ]
        return self

    async def _read(self, stream: str, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            self.lines.append(Line(stream, line.decode("utf-8", errors="replace").rstrip("\n")))
            self._changed.set()
        self._changed.set()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        assert self.process is not None
        return self.process.returncode

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def text(self, stream: str | None = None) -> str:
        return "\n".join(ln.text for ln in self.lines if stream is None or ln.stream == stream)

    def tail(self, n: int = 60) -> str:
        shown = "\n".join(f"[{ln.stream}] {ln.text}" for ln in self.lines[-n:])
        return f"--- last output of {self.name} (pid {self.pid}) ---\n{shown}"

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log lines (stderr) whose event is ``name``."""
        found = []
        for ln in self.lines:
            if ln.stream != "stderr" or not ln.text.startswith("{"):
                continue
            try:
                record = json.loads(ln.text)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == name:
                found.append(record)
        return found

    async def wait_event(
        self, names: tuple[str, ...], timeout: float = 15.0, **fields: object
    ) -> dict[str, Any]:
        """The first JSON log line whose event is one of ``names`` and has these ``fields``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for name in names:
                for record in self.events(name):
                    if all(record.get(k) == v for k, v in fields.items()):
                        return record
            if loop.time() > deadline:
                raise AssertionError(
                    f"{self.name} logged no {names} with {fields} within {timeout} s\n"
                    + self.tail()
                )
            await asyncio.sleep(0.05)

    async def wait_line(
        self, pattern: str, timeout: float = 15.0, stream: str | None = None, start: int = 0
    ) -> re.Match[str]:
        """The first line (from index ``start``) matching ``pattern``; fails if none comes."""
        rx = re.compile(pattern)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = start
        while True:
            for ln in self.lines[seen:]:
                if stream is None or ln.stream == stream:
                    match = rx.search(ln.text)
                    if match:
                        return match
            seen = len(self.lines)
            if all(r.done() for r in self._readers):
                raise AssertionError(
                    f"{self.name} ended (exit {self.returncode}) without printing "
                    f"{pattern!r}\n{self.tail()}"
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.name} did not print {pattern!r} within {timeout} s\n{self.tail()}"
                )
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def wait_exit(self, timeout: float) -> int:
        """The exit code; fails (after killing it) if the process runs longer than ``timeout``."""
        assert self.process is not None
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            await self.kill()
            raise AssertionError(
                f"{self.name} did not exit within {timeout} s\n{self.tail()}"
            ) from None
        await asyncio.gather(*self._readers)
        return code

    async def kill(self) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        await asyncio.gather(*self._readers)

    def assert_alive(self) -> None:
        assert self.process is not None
        if self.process.returncode is not None:
            raise AssertionError(f"{self.name} exited with {self.returncode}\n{self.tail()}")


class Procs:
    """The processes of one test: started here, killed at teardown if still running."""

    def __init__(self) -> None:
        self.started: list[Proc] = []

    async def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        proc = await Proc(name, list(args), env=env or {}).start()
        self.started.append(proc)
        return proc

    async def broker(
        self, data_dir: Path, *extra: str, port: int | None = None, name: str = "broker"
    ) -> Broker:
        """``python -m broker`` on free loopback ports; returns when both ports listen."""
        main, health = free_ports(2)
        if port is not None:  # a restart in place: the health port must differ from it
            main, health = port, health if health != port else main
        broker = Broker(main, health, data_dir)
        args = (*broker.base_args(), *BROKER_SERVER, *extra)
        broker.proc = await self.start(name, "-m", "broker", *args)
        await broker.wait_listening()
        return broker

    async def connector(
        self,
        broker_url: str,
        token: str | Path,
        llm_url: str,
        name: str | None,
        *extra: str,
    ) -> Proc:
        """A connector process; ``token`` as a Path is passed as --broker-token-file, and
        ``name`` None leaves the default name (host name and LLM address)."""
        secret = (
            ["--broker-token-file", str(token)]
            if isinstance(token, Path)
            else [
                "--broker-token",
                token,
            ]
        )
        named = ["--name", name] if name is not None else []
        return await self.start(
            f"connector {name or llm_url}",
            "-m",
            "connector",
            "--broker-url",
            broker_url,
            *secret,
            "--llm-url",
            llm_url,
            *named,
            *extra,
        )

    async def close(self) -> None:
        for proc in self.started:
            if proc.process is not None:
                await proc.kill()


@dataclass
class Broker:
    port: int
    health_port: int
    data_dir: Path
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}/health"

    def base_args(self) -> list[str]:
        return [
            "--port",
            str(self.port),
            "--health-port",
            str(self.health_port),
            "--host",
            "127.0.0.1",
            "--data-dir",
            str(self.data_dir),
        ]

    async def wait_listening(self, timeout: float = 20.0) -> None:
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for port in (self.port, self.health_port):
            while True:
                self.proc.assert_alive()
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    if loop.time() > deadline:
                        raise AssertionError(
                            f"broker does not listen on {port} after {timeout} s\n"
                            + self.proc.tail()
                        ) from None
                    await asyncio.sleep(0.05)
                else:
                    writer.close()
                    await writer.wait_closed()
                    break

    async def health(self) -> dict[str, Any]:
        async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
            response = await client.get(self.health_url)
            response.raise_for_status()
            body: dict[str, Any] = response.json()
            return body

    async def wait_model(
        self,
        model: str,
        timeout: float = 15.0,
        connector: str | None = None,
        watch: Proc | None = None,
    ) -> float:
        """Seconds until /health lists ``model`` (served by ``connector``, if given).

        ``watch`` is the connector process: its output explains a failure.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        last: dict[str, Any] = {}
        while loop.time() - started < timeout:
            if self.proc is not None:
                self.proc.assert_alive()
            try:
                last = await self.health()
            except httpx.HTTPError as exc:
                last = {"error": repr(exc)}
            else:
                names = [c.get("name") for c in last.get("connectors", []) if model in c["models"]]
                if model in last.get("models", []) and (connector is None or connector in names):
                    return loop.time() - started
            await asyncio.sleep(0.1)
        raise AssertionError(
            f"model {model!r} not live on the broker after {timeout} s: {last}\n"
            + (self.proc.tail() if self.proc else "")
            + ("\n" + watch.tail() if watch else "")
        )


def openai_client(base_url: str, api_key: str, timeout: float = 30.0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=base_url + "/v1",
        api_key=api_key,
        max_retries=0,
        timeout=timeout,
        http_client=openai.DefaultAsyncHttpxClient(trust_env=False, timeout=timeout),
    )
