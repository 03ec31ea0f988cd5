"""Local mode: the same workload direct to the upstream and through the relay, interleaved."""

from __future__ import annotations

import asyncio
import json
import ssl
import statistics
import time
from dataclasses import asdict, dataclass, field

from shared.bench.client import Connection, Result
from shared.bench.procs import KEY, Setup


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    requests: int
    chunks: int
    chunk_bytes: int = 64
    delay_ms: float = 0.0
    upload_mode: str = "stream"
    connectors: int = 1
    http2: bool = False
    tls: bool = False
    rounds: int = 2

    @property
    def setup_key(self) -> tuple[str, int, bool, bool]:
        return (self.upload_mode, self.connectors, self.http2, self.tls)


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


@dataclass
class Row:
    scenario: Scenario
    direct: Side
    relay: Side
    broker_cpu_s: float
    connector_cpu_s: float
    broker_rss_mib: float
    connector_rss_mib: float

    def summary(self) -> dict[str, object]:
        d, r = self.direct, self.relay
        chunks = max(1, r.events)
        reqs = max(1, len(r.ok()))
        return {
            "scenario": asdict(self.scenario),
            "direct": {
                "ttfb_ms": {
                    q: d.pct("ttfb", p) for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
                },
                "ttlb_ms": {
                    q: d.pct("ttlb", p) for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
                },
                "chunks_per_s": d.chunks_per_s,
                "req_per_s": d.req_per_s,
                "errors": d.errors,
            },
            "relay": {
                "ttfb_ms": {
                    q: r.pct("ttfb", p) for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
                },
                "ttlb_ms": {
                    q: r.pct("ttlb", p) for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
                },
                "chunks_per_s": r.chunks_per_s,
                "req_per_s": r.req_per_s,
                "errors": r.errors,
            },
            "ttfb_p50_added_ms": r.pct("ttfb", 0.5) - d.pct("ttfb", 0.5),
            "throughput_ratio": (r.chunks_per_s / d.chunks_per_s) if d.chunks_per_s else None,
            "broker_us_per_chunk": self.broker_cpu_s * 1e6 / chunks,
            "connector_us_per_chunk": self.connector_cpu_s * 1e6 / chunks,
            "broker_ms_per_request": self.broker_cpu_s * 1e3 / reqs,
            "connector_ms_per_request": self.connector_cpu_s * 1e3 / reqs,
            "broker_peak_rss_mib": self.broker_rss_mib,
            "connector_peak_rss_mib": self.connector_rss_mib,
        }


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


async def run_scenario(setup: Setup, s: Scenario) -> Row:
    direct, relay = Side(), Side()
    direct_headers = {"Content-Type": "application/json"}
    relay_headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    per_round = max(1, s.requests // s.rounds)
    tls = None
    if setup.tls:
        tls = ssl.create_default_context(cafile=str(setup.workdir / "cert.pem"))
    broker_cpu = connector_cpu = 0.0
    # Warm up both paths (connections, imports, caches) outside the measurement.
    await _batch(setup.upstream_port, "/v1/chat/completions", s, min(2, per_round), direct_headers)
    await _batch(
        setup.broker_port, "/v1/chat/completions", s, min(2, per_round), relay_headers, tls
    )
    for _ in range(s.rounds):
        part = await _batch(
            setup.upstream_port, "/v1/chat/completions", s, per_round, direct_headers
        )
        direct.results += part.results
        direct.wall += part.wall
        b0 = setup.broker.cpu_seconds()
        c0 = sum(p.cpu_seconds() for p in setup.connector_procs)
        part = await _batch(
            setup.broker_port, "/v1/chat/completions", s, per_round, relay_headers, tls
        )
        broker_cpu += setup.broker.cpu_seconds() - b0
        connector_cpu += sum(p.cpu_seconds() for p in setup.connector_procs) - c0
        relay.results += part.results
        relay.wall += part.wall
    return Row(
        scenario=s,
        direct=direct,
        relay=relay,
        broker_cpu_s=broker_cpu,
        connector_cpu_s=connector_cpu,
        broker_rss_mib=setup.broker.memory_kib() / 1024.0,
        connector_rss_mib=max(p.memory_kib() for p in setup.connector_procs) / 1024.0,
    )


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
}


async def run_profile(scenarios: list[Scenario], progress: bool = True) -> list[Row]:
    rows: list[Row] = []
    setups: dict[tuple[str, int, bool, bool], Setup] = {}
    try:
        for s in scenarios:
            setup = setups.get(s.setup_key)
            if setup is None:
                setup = Setup(
                    connectors=s.connectors, upload_mode=s.upload_mode, http2=s.http2, tls=s.tls
                )
                await setup.start()
                setups[s.setup_key] = setup
            if progress:
                print(f"  running {s.name} ...", flush=True)
            rows.append(await run_scenario(setup, s))
    finally:
        for setup in setups.values():
            setup.stop()
    return rows


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
