"""Several brokers on one Redis (docs/scale-out.md): throughput with 1, 2 and 3 brokers, and
what the Redis relay state adds to time to first byte and per chunk over the in-memory one.

Rows, each with the same fake upstream and one connector per broker:

- ``memory 1``: one broker without Redis (today's default), the baseline;
- ``redis N``: N brokers sharing a local redis-server, clients spread over them, each
  connector attached to its own broker (work still crosses brokers: any connector may take
  any request);
- ``redis cross``: two brokers, clients only on the first, the connector only on the
  second, so every frame of every answer travels through Redis (the worst case).

CPU is summed over every broker process (and shown for redis-server), per relayed chunk.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from shared.bench.local import Scenario, Side, _batch
from shared.bench.procs import (
    KEY,
    TOKEN,
    Proc,
    get_json,
    raise_fd_limit,
    spawn,
    wait_port,
)


@dataclass
class BrokerRow:
    name: str
    brokers: int
    side: Side
    broker_cpu_s: float
    redis_cpu_s: float

    @property
    def ttfb_p50_ms(self) -> float:
        return self.side.pct("ttfb", 0.5)

    @property
    def broker_us_per_chunk(self) -> float:
        return self.broker_cpu_s * 1e6 / max(1, self.side.events)

    def summary(self) -> dict[str, object]:
        chunks = max(1, self.side.events)
        return {
            "name": self.name,
            "brokers": self.brokers,
            "req_per_s": self.side.req_per_s,
            "chunks_per_s": self.side.chunks_per_s,
            "ttfb_p50_ms": self.side.pct("ttfb", 0.5),
            "ttfb_p90_ms": self.side.pct("ttfb", 0.9),
            "ttlb_p50_ms": self.side.pct("ttlb", 0.5),
            "broker_us_per_chunk": self.broker_cpu_s * 1e6 / chunks,
            "redis_us_per_chunk": self.redis_cpu_s * 1e6 / chunks,
            "errors": self.side.errors,
        }


@dataclass
class Cluster:
    """An upstream, ``brokers`` brokers (on Redis or not) and connectors where asked."""

    brokers: int
    redis: bool
    connectors_on: list[int]  # broker index of each connector
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rllm-bench-")))
    procs: list[Proc] = field(default_factory=list)
    broker_procs: list[Proc] = field(default_factory=list)
    redis_proc: Proc | None = None
    ports: list[int] = field(default_factory=list)
    health: list[int] = field(default_factory=list)
    upstream_port: int = 0

    async def start(self) -> None:
        raise_fd_limit()
        log = self.workdir / "processes.log"
        # Every port at once, so no two processes are handed the same one.
        ports = _free_ports(2 + 2 * self.brokers)
        self.upstream_port = ports.pop()
        self.procs.append(
            spawn(
                "upstream", ["-m", "shared.bench.upstream", "--port", str(self.upstream_port)], log
            )
        )
        redis_args: list[str] = []
        if self.redis:
            port = ports.pop()
            self.redis_proc = _start_redis(port, log)
            self.procs.append(self.redis_proc)
            await wait_port(port)
            redis_args = ["--redis-url", f"redis://127.0.0.1:{port}/0"]
        for i in range(self.brokers):
            port, health = ports.pop(), ports.pop()
            proc = spawn(
                f"broker-{i}",
                ["-m", "broker", "--host", "127.0.0.1", "--port", str(port),
                 "--health-port", str(health), "--data-dir", str(self.workdir / f"data{i}"),
                 "--user-api-key", KEY, "--connector-token", TOKEN, "--no-generate-credentials",
                 "--queue-max", "5000", "--concurrency-limit", "5000",  # one key sends all
                 "--log-level", "warning", "--log-format", "json",
                 *redis_args],
                log,
            )  # fmt: skip
            self.procs.append(proc)
            self.broker_procs.append(proc)
            self.ports.append(port)
            self.health.append(health)
        await wait_port(self.upstream_port)
        for port in self.ports:
            await wait_port(port, timeout=60.0)
        for n, at in enumerate(self.connectors_on):
            self.procs.append(
                spawn(
                    f"connector-{n}",
                    ["-m", "connector", "--broker-url", f"http://127.0.0.1:{self.ports[at]}",
                     "--broker-token", TOKEN, "--llm-url", f"http://127.0.0.1:{self.upstream_port}",
                     "--model", "bench", "--name", f"bench-{n}", "--capacity", "1100",
                     "--upload-mode", "stream", "--log-level", "warning", "--log-format", "json"],
                    log,
                )
            )  # fmt: skip
        await self._wait_sessions(len(self.connectors_on))

    async def _wait_sessions(self, want: int, timeout: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                body = await get_json(self.health[0], "/health")
            except (OSError, ValueError, IndexError):
                body = {}
            if isinstance(body, dict) and len(body.get("connectors", [])) >= want:
                return
            await asyncio.sleep(0.1)
        raise TimeoutError("connectors did not register; see " + str(self.workdir))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def cpu(self) -> tuple[float, float]:
        redis = self.redis_proc.cpu_seconds() if self.redis_proc else 0.0
        return sum(p.cpu_seconds() for p in self.broker_procs), redis


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _start_redis(port: int, log: Path) -> Proc:
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("redis-server is not installed (Debian: redis-server)")
    args = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with log.open("ab") as out:
        popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    return Proc("redis", popen)


async def _spread(ports: list[int], s: Scenario, count: int) -> Side:
    """``count`` requests at ``s.concurrency``, the client connections spread over ``ports``."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    shares = [
        (port, max(1, s.concurrency // len(ports)), max(1, count // len(ports))) for port in ports
    ]
    parts = await asyncio.gather(
        *(
            _batch(port, "/v1/chat/completions", _share(s, conc, n), n, headers)
            for port, conc, n in shares
        )
    )  # fmt: skip
    side = Side()
    for part in parts:
        side.results += part.results
    side.wall = max(part.wall for part in parts)
    return side


def _share(s: Scenario, concurrency: int, requests: int) -> Scenario:
    return Scenario(s.name, concurrency, requests, s.chunks, s.chunk_bytes, s.delay_ms)


LAYOUTS: list[tuple[str, int, bool, list[int], int]] = [
    # name, brokers, redis, connector per broker index, client brokers
    ("memory 1", 1, False, [0], 1),
    ("redis 1", 1, True, [0], 1),
    ("redis 2", 2, True, [0, 1], 2),
    ("redis 3", 3, True, [0, 1, 2], 3),
    ("redis cross", 2, True, [1], 1),
]


async def run_brokers(s: Scenario, rounds: int = 2, progress: bool = True) -> list[BrokerRow]:
    rows: list[BrokerRow] = []
    for name, brokers, redis, connectors_on, clients in LAYOUTS:
        if progress:
            print(f"  running {name} ...", flush=True)
        cluster = Cluster(brokers, redis, connectors_on)
        try:
            await cluster.start()
            ports = cluster.ports[:clients]
            await _spread(ports, s, max(2, len(ports) * 2))  # warm-up, not measured
            side = Side()
            b0, r0 = cluster.cpu()
            for _ in range(rounds):
                part = await _spread(ports, s, max(1, s.requests // rounds))
                side.results += part.results
                side.wall += part.wall
            b1, r1 = cluster.cpu()
            rows.append(BrokerRow(name, brokers, side, b1 - b0, r1 - r0))
        finally:
            cluster.stop()
    return rows


def brokers_table(rows: list[BrokerRow]) -> str:
    head = (
        "| layout | brokers | req/s | chunks/s | TTFB p50 ms | TTFB p90 ms | TTLB p50 ms "
        "| broker µs/chunk | redis µs/chunk | errors |"
    )
    lines = [head, "|" + "---|" * 10]
    for row in rows:
        d = row.summary()
        lines.append(
            f"| {row.name} | {row.brokers} | {d['req_per_s']:.1f} | {d['chunks_per_s']:.0f} "
            f"| {d['ttfb_p50_ms']:.2f} | {d['ttfb_p90_ms']:.2f} | {d['ttlb_p50_ms']:.1f} "
            f"| {d['broker_us_per_chunk']:.1f} | {d['redis_us_per_chunk']:.1f} | {d['errors']} |"
        )
    if rows:
        lines.append("")
    for row in rows[1:]:
        base = rows[0]
        lines.append(
            f"{row.name} vs {base.name}: TTFB p50 {row.ttfb_p50_ms - base.ttfb_p50_ms:+.2f} ms, "
            f"broker CPU per chunk {row.broker_us_per_chunk - base.broker_us_per_chunk:+.1f} µs"
        )
    return "\n".join(lines)
