"""Start the upstream, broker and connectors as processes; read their CPU time and memory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

KEY = "sk-" + "b" * 32
TOKEN = "ct-bench"
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_fd_limit() -> None:
    """Lift the soft limit to the hard one (at most 65,536); the processes started after
    inherit it. 5,000 streams need over 5,000 sockets in the benchmark, the broker and the
    connector each (API clients and upstream calls)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, 65536), hard))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time process ``pid`` has used so far (Linux /proc; 0 if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.popen.pid)

    def memory_kib(self, key: str = "VmHWM") -> int:
        try:
            for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


async def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on port {port}") from None
            await asyncio.sleep(0.05)


def write_self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (the connector trusts it with --ca-bundle)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def bytecode_env() -> dict[str, str]:
    """Python's bytecode cache for every measured process (ours and a peer's), in a
    directory of the benchmark's own.

    Installed packages come with their bytecode; a process that compiles every module it
    imports (``PYTHONDONTWRITEBYTECODE``, as some CI and sandbox environments set) starts
    seconds slower and its peak RSS includes the compiler's transient memory. Whoever
    starts first fills the cache; ``warm_bytecode`` does that before anything is measured.
    """
    return {"PYTHONPYCACHEPREFIX": str(Path(tempfile.gettempdir()) / "remotellm-bench-pycache")}


def warm_bytecode(python: str, imports: str, env: dict[str, str] | None = None) -> None:
    """Import ``imports`` once in ``python`` with the bytecode cache on (see above)."""
    child_env = dict(os.environ, **bytecode_env(), **(env or {}))
    child_env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([python, "-c", imports], env=child_env, capture_output=True, check=False)


OUR_IMPORTS = (
    "import broker.cli.main, broker.server, broker.composition, connector.cli, connector.runner, "
    "connector.tls, connector.check, shared.bench.upstream, uvloop"
)


def spawn(
    name: str,
    args: list[str],
    log: Path,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
) -> Proc:
    """Start ``python *args`` with its output appended to ``log``.

    ``python`` is ours unless a peer relay is benchmarked: then it is the interpreter of the
    venv the user installed that peer into (``--peer-python``).
    """
    child_env = dict(os.environ, PYTHONUNBUFFERED="1", **bytecode_env(), **(env or {}))
    child_env.pop("PYTHONDONTWRITEBYTECODE", None)
    with log.open("ab") as handle:  # the child keeps its own copy of the descriptor
        popen = subprocess.Popen(
            [python, *args], stdout=handle, stderr=subprocess.STDOUT, env=child_env
        )
    return Proc(name, popen)


async def get_json(port: int, path: str) -> object:
    """GET a small JSON document from 127.0.0.1 (health endpoints while starting)."""
    import json

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        raw = await reader.read()
    finally:
        writer.close()
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


@dataclass
class Setup:
    """One upstream, one broker and N connectors (mux, stream or parts upload)."""

    connectors: int = 1
    upload_mode: str = "mux"
    http2: bool = False
    tls: bool = False
    server: str = "hypercorn"  # the broker's --server
    capacity: int = 1100
    trace: bool = False  # --trace-hops on the broker and connectors (shared/bench/hops.py)
    procs: list[Proc] = field(default_factory=list)
    upstream_port: int = 0
    broker_port: int = 0
    health_port: int = 0
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rllm-bench-")))

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def broker(self) -> Proc:
        return self.procs[1]

    @property
    def log(self) -> Path:
        """Where every process of this setup writes its output (JSON lines)."""
        return self.workdir / "processes.log"

    @property
    def _trace_args(self) -> list[str]:
        # The hop_trace lines are info level: the rest of info costs little at one stream.
        return ["--trace-hops", "--log-level", "info"] if self.trace else ["--log-level", "warning"]

    @property
    def connector_procs(self) -> list[Proc]:
        return self.procs[2:]

    async def start(self) -> None:
        raise_fd_limit()
        warm_bytecode(sys.executable, OUR_IMPORTS)
        log = self.log
        self.upstream_port = free_port()
        self.procs.append(
            spawn(
                "upstream",
                [
                    "-m",
                    "shared.bench.upstream",
                    "--port",
                    str(self.upstream_port),
                    *(["--trace"] if self.trace else []),
                ],
                log,
            )
        )
        await wait_port(self.upstream_port)
        self.broker_port, self.health_port = free_port(), free_port()
        tls_args: list[str] = []
        if self.tls:
            cert, key = write_self_signed(self.workdir)
            tls_args = ["--certfile", str(cert), "--keyfile", str(key)]
        self.procs.append(
            spawn(
                "broker",
                [
                    "-m",
                    "broker",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.broker_port),
                    "--health-port",
                    str(self.health_port),
                    "--data-dir",
                    str(self.workdir / "data"),
                    "--user-api-key",
                    KEY,
                    "--connector-token",
                    TOKEN,
                    "--no-generate-credentials",
                    "--queue-max",
                    "10000",
                    "--concurrency-limit",  # one key sends every request
                    "10000",
                    "--backlog",  # a burst of 5,000 new clients (Linux caps it at somaxconn)
                    "4096",
                    *self._trace_args,
                    "--log-format",
                    "json",
                    "--server",
                    self.server,
                    *tls_args,
                ],
                log,
            )
        )
        await wait_port(self.broker_port)
        for i in range(self.connectors):
            args = [
                "-m",
                "connector",
                "--broker-url",
                f"{self.scheme}://127.0.0.1:{self.broker_port}",
                "--broker-token",
                TOKEN,
                "--llm-url",
                f"http://127.0.0.1:{self.upstream_port}",
                "--model",
                "bench",
                "--name",
                f"bench-{i}",
                "--capacity",
                str(self.capacity),
                "--upload-mode",
                self.upload_mode,
                *self._trace_args,
                "--log-format",
                "json",
            ]
            if self.http2:
                args.append("--http2")
            if self.tls:
                args += ["--ca-bundle", str(self.workdir / "cert.pem")]
            self.procs.append(spawn(f"connector-{i}", args, log))
        await self._wait_sessions()

    async def _wait_sessions(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, IndexError):
                body = await get_json(self.health_port, "/health")
                if isinstance(body, dict) and len(body.get("connectors", [])) >= self.connectors:
                    return
            await asyncio.sleep(0.1)
        raise TimeoutError("connectors did not register; see " + str(self.workdir))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
