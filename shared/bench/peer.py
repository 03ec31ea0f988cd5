"""A peer relay, installed by the user outside this project, measured in the same run as ours.

The benchmark never ships a peer's code: the user fetches it, installs it into a venv of
their own and names that venv's interpreter (``--peer-python``). What this module knows
about a peer is how to start its broker and connector against our fake upstream, how to
tell that its connector is registered, and which URL an API client calls. One peer is
described so far: ``original``, the WebSocket relay RemoteLLM replaces
(viljo/RemoteLLMconnector; aiohttp broker, websockets connector).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.bench.procs import (
    KEY,
    TOKEN,
    Proc,
    free_port,
    get_json,
    spawn,
    wait_port,
    warm_bytecode,
)


@dataclass(frozen=True)
class PeerPorts:
    upstream: int
    broker: int
    health: int


@dataclass(frozen=True)
class PeerSpec:
    name: str
    summary: str
    imports: str  # a statement that fails when the peer is not installed
    broker_args: Callable[[PeerPorts], list[str]]
    connector_args: Callable[[PeerPorts, Path, int], list[str]]
    registered: Callable[[object], int]  # connectors the broker's health document reports


# The original's health server binds 0.0.0.0 whatever it is told; the benchmark stays on
# loopback, so its aiohttp sites are started through this wrapper (our code, not the peer's).
_LOOPBACK = """
import runpy, sys
from aiohttp import web
_init = web.TCPSite.__init__
def _loopback(self, runner, host=None, port=None, *args, **kwargs):
    _init(self, runner, "127.0.0.1", port, *args, **kwargs)
web.TCPSite.__init__ = _loopback
runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
"""


def _original_broker(ports: PeerPorts) -> list[str]:
    return [
        "-c",
        _LOOPBACK,
        "remotellm.broker",
        "--host",
        "127.0.0.1",
        "--port",
        str(ports.broker),
        "--health-port",
        str(ports.health),
        "--connector-token",
        TOKEN,
        "--user-api-key",
        KEY,
        "--log-level",
        "WARNING",
    ]


def _original_connector(ports: PeerPorts, workdir: Path, index: int) -> list[str]:
    return [
        "-c",
        _LOOPBACK,
        "remotellm.connector",
        "--llm-url",
        f"http://127.0.0.1:{ports.upstream}",
        "--broker-url",
        f"ws://127.0.0.1:{ports.broker}/ws",
        "--broker-token",
        TOKEN,
        "--model",
        "bench",
        "--connector-name",
        f"bench-peer-{index}",
        "--credentials-file",
        str(workdir / f"credentials-{index}.yaml"),
        "--log-level",
        "WARNING",
    ]


def _original_registered(health: object) -> int:
    if isinstance(health, dict):
        return int(health.get("connectors_connected", 0))
    return 0


PEERS: dict[str, PeerSpec] = {
    "original": PeerSpec(
        name="original",
        summary="viljo/RemoteLLMconnector, the WebSocket relay (aiohttp broker, /ws)",
        imports="import remotellm.broker.main, remotellm.connector.main",
        broker_args=_original_broker,
        connector_args=_original_connector,
        registered=_original_registered,
    )
}


@dataclass(frozen=True)
class PeerOptions:
    """What the user said on the command line: which peer, whose Python, which source."""

    name: str
    python: Path
    src: Path | None = None

    @property
    def spec(self) -> PeerSpec:
        return PEERS[self.name]

    def env(self) -> dict[str, str]:
        if self.src is None:
            return {}
        # A source checkout (src/ layout or flat) runs in place; the venv gives its deps.
        root = self.src / "src" if (self.src / "src").is_dir() else self.src
        return {"PYTHONPATH": str(root)}

    def problem(self) -> str | None:
        """Why the peer cannot start (with the fix), or None when it can."""
        if not self.python.exists():
            return f"--peer-python {self.python} does not exist"
        if self.src is not None and not self.src.is_dir():
            return f"--peer-src {self.src} is not a directory"
        check = subprocess.run(  # the user's own interpreter, asked to import the peer
            [str(self.python), "-c", self.spec.imports],
            env=dict(os.environ, **self.env()),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check.returncode != 0:
            last = (check.stderr.strip().splitlines() or ["(no output)"])[-1]
            return (
                f"{self.python} cannot import the {self.name} peer ({last}); install it "
                f"there first: {self.python.parent / 'pip'} install <its source directory>"
            )
        return None


@dataclass
class PeerSetup:
    """The peer's broker and connector(s), talking to our already running fake upstream."""

    options: PeerOptions
    upstream_port: int
    connectors: int = 1
    procs: list[Proc] = field(default_factory=list)
    broker_port: int = 0
    health_port: int = 0
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rllm-peer-")))

    @property
    def name(self) -> str:
        return self.options.name

    @property
    def broker(self) -> Proc:
        return self.procs[0]

    @property
    def connector_procs(self) -> list[Proc]:
        return self.procs[1:]

    async def start(self) -> None:
        spec, log = self.options.spec, self.workdir / "processes.log"
        ports = PeerPorts(self.upstream_port, free_port(), free_port())
        self.broker_port, self.health_port = ports.broker, ports.health
        python, env = str(self.options.python), self.options.env()
        warm_bytecode(python, spec.imports, env)  # the same bytecode cache as ours
        broker = spawn(f"{spec.name}-broker", spec.broker_args(ports), log, python, env)
        self.procs.append(broker)
        await wait_port(ports.broker)
        await wait_port(ports.health)
        for i in range(self.connectors):
            args = spec.connector_args(ports, self.workdir, i)
            self.procs.append(spawn(f"{spec.name}-connector-{i}", args, log, python, env))
        await self._wait_registered()

    async def _wait_registered(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, IndexError):
                health = await get_json(self.health_port, "/health")
                if self.options.spec.registered(health) >= self.connectors:
                    return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.name} connectors did not register; see {self.workdir}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
