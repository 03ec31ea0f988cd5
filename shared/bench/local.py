"""Local mode: the same workload direct to the upstream and through the relay, interleaved."""

from __future__ import annotations

import asyncio
import json
import ssl
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

from shared.bench.client import Connection, Result
from shared.bench.hops import collect, hop_rows
from shared.bench.peer import PeerOptions, PeerSetup
from shared.bench.procs import KEY, Proc, Setup

# The broker's --server choices (broker/settings.py; shared/ starts the broker as a process
# and never imports it: tests/unit/shared checks the two agree), the default first.
SERVERS = ("hypercorn", "uvicorn")
DEFAULT_SERVER = SERVERS[0]


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    requests: int
    chunks: int
    chunk_bytes: int = 64
    delay_ms: float = 0.0
    upload_mode: str = "mux"  # what auto picks on a path that streams bodies
    connectors: int = 1
    http2: bool = False
    tls: bool = False
    rounds: int = 2
    capacity: int = 1100  # the connectors' --capacity: above the concurrency, none waits

    @property
    def setup_key(self) -> tuple[str, int, bool, bool, int]:
        return (self.upload_mode, self.connectors, self.http2, self.tls, self.capacity)


@dataclass
class Side:
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0

    def ok(self) -> list[Result]:
        return [r for r in self.results if r.ok]

    @property
    def errors(self) -> int:
        return sum(1 for r in self.results if not r.ok)

    def pct(self, attr: str, q: float) -> float:
        values: list[float] = sorted(float(getattr(r, attr)) for r in self.ok())
        if not values:
            return float("nan")
        index = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
        return float(values[index] * 1000.0)

    @property
    def events(self) -> int:
        return sum(r.events for r in self.ok())

    @property
    def chunks_per_s(self) -> float:
        return self.events / self.wall if self.wall else 0.0

    @property
    def req_per_s(self) -> float:
        return len(self.ok()) / self.wall if self.wall else 0.0


def _pcts(side: Side, attr: str) -> dict[str, float]:
    return {q: side.pct(attr, p) for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}


def _side_summary(side: Side) -> dict[str, object]:
    return {
        "ttfb_ms": _pcts(side, "ttfb"),
        "ttlb_ms": _pcts(side, "ttlb"),
        "chunks_per_s": side.chunks_per_s,
        "req_per_s": side.req_per_s,
        "requests": len(side.results),
        "errors": side.errors,
        "first_error": next((r.error for r in side.results if not r.ok), None),
    }


@dataclass
class Relayed:
    """One relay's results in one scenario: client view plus its processes' CPU and memory."""

    name: str
    side: Side
    broker_cpu_s: float = 0.0
    connector_cpu_s: float = 0.0
    broker_rss_mib: float = 0.0
    connector_rss_mib: float = 0.0

    def cost(self) -> dict[str, float]:
        chunks = max(1, self.side.events)
        reqs = max(1, len(self.side.ok()))
        return {
            "broker_us_per_chunk": self.broker_cpu_s * 1e6 / chunks,
            "connector_us_per_chunk": self.connector_cpu_s * 1e6 / chunks,
            "broker_ms_per_request": self.broker_cpu_s * 1e3 / reqs,
            "connector_ms_per_request": self.connector_cpu_s * 1e3 / reqs,
            "broker_peak_rss_mib": self.broker_rss_mib,
            "connector_peak_rss_mib": self.connector_rss_mib,
        }


@dataclass
class Row:
    scenario: Scenario
    direct: Side
    ours: Relayed
    peers: list[Relayed] = field(default_factory=list)
    hops: list[dict[str, int]] = field(default_factory=list)  # --trace: marks per request
    # Our broker's --server, and whether the table names it (a run on several servers).
    server: str = DEFAULT_SERVER
    show_server: bool = False

    @property
    def label(self) -> str:
        if self.show_server:
            return f"{self.scenario.name} [{self.server}]"
        return self.scenario.name

    @property
    def relay(self) -> Side:
        return self.ours.side

    @property
    def broker_rss_mib(self) -> float:
        return self.ours.broker_rss_mib

    @property
    def connector_rss_mib(self) -> float:
        return self.ours.connector_rss_mib

    def added_ttfb_ms(self, relayed: Relayed) -> float:
        return relayed.side.pct("ttfb", 0.5) - self.direct.pct("ttfb", 0.5)

    def summary(self) -> dict[str, object]:
        d, r = self.direct, self.relay
        out: dict[str, object] = {
            "scenario": asdict(self.scenario),
            "server": self.server,
            "direct": _side_summary(d),
            "relay": _side_summary(r),
            "ttfb_p50_added_ms": self.added_ttfb_ms(self.ours),
            "throughput_ratio": (r.chunks_per_s / d.chunks_per_s) if d.chunks_per_s else None,
            **self.ours.cost(),
        }
        if self.hops:
            out["hops_ms"] = {hop: ms for hop, _, ms, _ in hop_rows(self.hops)}
        if self.peers:
            out["peers"] = {
                p.name: {
                    **_side_summary(p.side),
                    "ttfb_p50_added_ms": self.added_ttfb_ms(p),
                    **p.cost(),
                }
                for p in self.peers
            }
        return out


def _body(s: Scenario) -> bytes:
    return json.dumps(
        {
            "model": "bench",
            "stream": True,
            "max_tokens": s.chunks,
            "bench_chunk_bytes": s.chunk_bytes,
            "bench_delay_ms": s.delay_ms,
            "messages": [{"role": "user", "content": "bench"}],
        }
    ).encode()


async def _batch(
    port: int,
    path: str,
    s: Scenario,
    count: int,
    headers: dict[str, str],
    tls: ssl.SSLContext | None = None,
) -> Side:
    body = _body(s)
    remaining = count
    side = Side()
    workers = min(s.concurrency, count)
    conns = [Connection("127.0.0.1", port, tls) for _ in range(workers)]

    async def work(conn: Connection) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            side.results.append(await conn.post(path, body, headers))

    started = time.perf_counter()
    await asyncio.gather(*(work(c) for c in conns))
    side.wall = time.perf_counter() - started
    for conn in conns:
        await conn.close()
    return side


class RelayProcs(Protocol):
    """What a measured relay exposes: its API port and its processes (ours or a peer)."""

    @property
    def broker(self) -> Proc: ...

    @property
    def connector_procs(self) -> list[Proc]: ...


@dataclass
class _Path:
    relayed: Relayed
    procs: RelayProcs
    port: int
    tls: ssl.SSLContext | None = None

    async def round(self, s: Scenario, count: int, headers: dict[str, str]) -> None:
        b0 = self.procs.broker.cpu_seconds()
        c0 = sum(p.cpu_seconds() for p in self.procs.connector_procs)
        part = await _batch(self.port, "/v1/chat/completions", s, count, headers, self.tls)
        r = self.relayed
        r.broker_cpu_s += self.procs.broker.cpu_seconds() - b0
        r.connector_cpu_s += sum(p.cpu_seconds() for p in self.procs.connector_procs) - c0
        r.side.results += part.results
        r.side.wall += part.wall

    def read_memory(self) -> None:
        self.relayed.broker_rss_mib = self.procs.broker.memory_kib() / 1024.0
        self.relayed.connector_rss_mib = (
            max(p.memory_kib() for p in self.procs.connector_procs) / 1024.0
        )


async def run_scenario(setup: Setup, s: Scenario, peers: Sequence[PeerSetup] = ()) -> Row:
    direct = Side()
    direct_headers = {"Content-Type": "application/json"}
    relay_headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    per_round = max(1, s.requests // s.rounds)
    tls = None
    if setup.tls:
        tls = ssl.create_default_context(cafile=str(setup.workdir / "cert.pem"))
    ours = _Path(Relayed("ours", Side()), setup, setup.broker_port, tls)
    paths = [_Path(Relayed(p.name, Side()), p, p.broker_port) for p in peers] + [ours]
    # Warm up every path (connections, imports, caches) outside the measurement.
    await _batch(setup.upstream_port, "/v1/chat/completions", s, min(2, per_round), direct_headers)
    for path in paths:
        await _batch(
            path.port, "/v1/chat/completions", s, min(2, per_round), relay_headers, path.tls
        )
    for index in range(s.rounds):
        part = await _batch(
            setup.upstream_port, "/v1/chat/completions", s, per_round, direct_headers
        )
        direct.results += part.results
        direct.wall += part.wall
        # Relays take turns going first, so none always runs right after the direct round.
        turn = index % len(paths)
        for path in paths[turn:] + paths[:turn]:
            await path.round(s, per_round, relay_headers)
    for path in paths:
        path.read_memory()
    return Row(scenario=s, direct=direct, ours=ours.relayed, peers=[p.relayed for p in paths[:-1]])


PROFILES: dict[str, list[Scenario]] = {
    "smoke": [
        Scenario("ttfb", concurrency=1, requests=6, chunks=20),
        Scenario("c10", concurrency=10, requests=20, chunks=20),
        Scenario("parts", concurrency=2, requests=4, chunks=10, delay_ms=2, upload_mode="parts"),
    ],
    "standard": [
        Scenario("ttfb c1 200 chunks", concurrency=1, requests=100, chunks=200),
        Scenario("paced c1 5ms", concurrency=1, requests=6, chunks=100, delay_ms=5),
        Scenario("c10 back-to-back", concurrency=10, requests=100, chunks=100),
        Scenario("c50 paced 5ms", concurrency=50, requests=100, chunks=100, delay_ms=5),
        Scenario("c100 back-to-back", concurrency=100, requests=200, chunks=50),
        Scenario("c1000 paced 50ms", concurrency=1000, requests=2000, chunks=20, delay_ms=50),
        Scenario("parts ttfb c1", concurrency=1, requests=40, chunks=200, upload_mode="parts"),
        # One upload POST per response (--upload-mode stream), against the mux rows above.
        Scenario("stream ttfb c1", concurrency=1, requests=100, chunks=200, upload_mode="stream"),
        Scenario(
            "stream c50 paced 5ms",
            concurrency=50,
            requests=100,
            chunks=100,
            delay_ms=5,
            upload_mode="stream",
        ),
        Scenario(
            "parts c50 paced 5ms",
            concurrency=50,
            requests=100,
            chunks=100,
            delay_ms=5,
            upload_mode="parts",
        ),
        Scenario("2 connectors c100", concurrency=100, requests=200, chunks=50, connectors=2),
        Scenario(
            "2 connectors c50 paced",
            concurrency=50,
            requests=100,
            chunks=100,
            delay_ms=5,
            connectors=2,
        ),
        # The connector's broker connection over TLS: HTTP/1.1 vs HTTP/2 (--http2).
        Scenario("TLS h1 ttfb c1", concurrency=1, requests=60, chunks=200, tls=True),
        Scenario("TLS h2 ttfb c1", concurrency=1, requests=60, chunks=200, tls=True, http2=True),
        Scenario(
            "TLS h1 c50 paced", concurrency=50, requests=100, chunks=100, delay_ms=5, tls=True
        ),
        Scenario(
            "TLS h2 c50 paced",
            concurrency=50,
            requests=100,
            chunks=100,
            delay_ms=5,
            tls=True,
            http2=True,
        ),
    ],
    # Issue 9's side by side with a peer relay (``--peer``): our connector at --capacity 1100.
    # Bounded: ~3,000 requests per relayed path, a few minutes for direct + two relays.
    "versus": [
        Scenario("ttfb c1 200 chunks", concurrency=1, requests=100, chunks=200),
        Scenario("unpaced c10 200 chunks", concurrency=10, requests=100, chunks=200),
        Scenario("c50 paced 5ms", concurrency=50, requests=100, chunks=200, delay_ms=5),
        Scenario("c100 paced 5ms", concurrency=100, requests=200, chunks=200, delay_ms=5),
        Scenario("c200 paced 5ms", concurrency=200, requests=400, chunks=200, delay_ms=5),
        Scenario("c50 paced 50ms 20 chunks", concurrency=50, requests=100, chunks=20, delay_ms=50),
        # Each round opens all its connections at once: a burst of 1,000 new clients.
        Scenario(
            "c1000 paced 50ms 20 chunks", concurrency=1000, requests=2000, chunks=20, delay_ms=50
        ),
        # Past 1,000: one burst of 5,000 new clients, each relayed at once (own processes,
        # so its peak RSS against the c1000 row's gives the memory per extra stream).
        Scenario(
            "c5000 paced 50ms 20 chunks",
            concurrency=5000,
            requests=5000,
            chunks=20,
            delay_ms=50,
            rounds=1,
            capacity=5500,
        ),
    ],
}


async def run_profile(
    scenarios: list[Scenario],
    progress: bool = True,
    peer: PeerOptions | None = None,
    servers: Sequence[str] = (DEFAULT_SERVER,),
    trace: bool = False,
) -> list[Row]:
    """Every scenario on each of ``servers`` (our broker's --server) in turn: one row each."""
    rows: list[Row] = []
    setups: dict[tuple[str, tuple[str, int, bool, bool, int]], Setup] = {}
    peers: dict[tuple[str, int, bool, bool, int], PeerSetup] = {}
    try:
        for s in scenarios:
            # A peer shares our fake upstream; over TLS the client's paths would differ.
            peer_setup = None
            for server in servers:
                setup = setups.get((server, s.setup_key))
                if setup is None:
                    setup = Setup(
                        connectors=s.connectors,
                        upload_mode=s.upload_mode,
                        http2=s.http2,
                        tls=s.tls,
                        server=server,
                        trace=trace,
                        capacity=s.capacity,
                    )
                    setups[(server, s.setup_key)] = setup
                    await setup.start()
                if peer is not None and not s.tls and peer_setup is None:
                    peer_setup = peers.get(s.setup_key)
                    if peer_setup is None:
                        peer_setup = PeerSetup(peer, setup.upstream_port, connectors=s.connectors)
                        peers[s.setup_key] = peer_setup
                        await peer_setup.start()
                if progress:
                    print(f"  running {s.name} on {server} ...", flush=True)
                row = await run_scenario(setup, s, [peer_setup] if peer_setup else [])
                row.server, row.show_server = server, len(servers) > 1
                if trace:
                    row.hops = await collect(setup.log, row.ours.side.results)
                rows.append(row)
    finally:
        for peer_setup in peers.values():
            peer_setup.stop()
        for setup in setups.values():
            setup.stop()
    return rows


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
