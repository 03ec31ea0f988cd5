"""The failover soak's load and its verdicts (tests/scaleout/test_failover_soak.py).

Several clients stream answers through nginx in a loop; each answer is classified by what
its client saw. ``whole``: byte for byte the reference answer (every token once, in order,
the finish chunk and ``[DONE]``). ``cut``: it began and then visibly failed (the broker's
SSE error event, or the connection ended mid-body). ``refused``: a non-200 answer before
any body. ``short``: a 200 that ended without an error and is not the reference (silently
short, duplicated or corrupt): never allowed. ``hung``: it did not end within ``HANG``:
never allowed. Each request carries its own x-request-id, which nginx logs with the
brokers it tried (``UPSTREAM_LOG``), so a failure is attributed to the broker that served
it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field

import httpx

from tests.support.stack import USER_KEY

MODEL = "fake-model"
TOKENS = 30
HANG = 20.0  # seconds: no request may take longer from start to end
PROBE_EVERY = 0.2  # seconds between attempts while waiting for service to come back
ERROR_EVENT = b'data: {"error"'
DONE = b"data: [DONE]\n\n"
BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": TOKENS,
    "stream": True,
}


@dataclass
class Outcome:
    label: str  # the x-request-id this client sent
    started: float
    ended: float
    kind: str  # whole, cut, refused, short, hung
    detail: str = ""


@dataclass
class Window:
    """Failures are excused for requests in flight between ``start`` and ``end`` (and, with
    ``port``, only those nginx sent to the broker on that port)."""

    name: str
    start: float
    end: float
    port: int | None = None
    code: str | None = None  # an error code that excuses a failure on any broker

    def excuses(self, o: Outcome, served_by: dict[str, int]) -> bool:
        if not (o.started <= self.end and o.ended >= self.start):
            return False
        if self.port is None or served_by.get(o.label) == self.port:
            return True
        return self.code is not None and f'"code": "{self.code}"' in o.detail


def api_client(base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {USER_KEY}"},
        timeout=httpx.Timeout(HANG),
        limits=httpx.Limits(max_connections=64),
        trust_env=False,
    )


def classify(status: int, data: bytes, reference: bytes) -> tuple[str, str]:
    if status != 200:
        return "refused", f"{status} {data[:200]!r}"
    if data == reference:
        return "whole", ""
    if ERROR_EVENT in data and data.endswith(DONE):
        return "cut", data[data.index(ERROR_EVENT) :][:200].decode(errors="replace")
    return "short", f"{len(data)} bytes, tail {data[-200:]!r}"


async def one_stream(api: httpx.AsyncClient, reference: bytes) -> Outcome:
    label = str(uuid.uuid4())
    started = time.monotonic()
    status, data = 0, bytearray()

    async def run() -> None:
        nonlocal status
        headers = {"x-request-id": label}
        async with api.stream("POST", "/v1/chat/completions", json=BODY, headers=headers) as r:
            status = r.status_code
            async for piece in r.aiter_bytes():
                data.extend(piece)

    try:
        await asyncio.wait_for(run(), HANG)
    except TimeoutError:
        return Outcome(label, started, time.monotonic(), "hung", f"{len(data)} bytes")
    except httpx.HTTPError as exc:
        kind = "cut" if status == 200 else "refused"
        return Outcome(label, started, time.monotonic(), kind, repr(exc))
    return Outcome(label, started, time.monotonic(), *classify(status, bytes(data), reference))


@dataclass
class Load:
    """``clients`` loops of ``one_stream`` until ``finish``."""

    api: httpx.AsyncClient
    reference: bytes
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, clients: int) -> None:
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(clients)]

    async def _loop(self) -> None:
        while not self._stop.is_set():
            outcome = await one_stream(self.api, self.reference)
            self.outcomes.append(outcome)
            if outcome.kind != "whole":
                await asyncio.sleep(0.1)  # as a client backing off before it retries

    async def finish(self) -> list[Outcome]:
        """Stop the loops; each ends its current request (bounded by ``HANG``)."""
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), HANG + 5.0)
        return self.outcomes


async def reference_answer(api: httpx.AsyncClient) -> bytes:
    """One answer before any fault: what every whole answer must equal, byte for byte."""
    async with api.stream("POST", "/v1/chat/completions", json=BODY) as r:
        assert r.status_code == 200, await r.aread()
        data = await r.aread()
    events = [json.loads(e[6:]) for e in data.decode().split("\n\n") if e[6:].startswith("{")]
    deltas = [c["choices"][0] for c in events if c.get("choices")]
    text = "".join(d["delta"].get("content") or "" for d in deltas)
    assert text == "".join(f"tok{i} " for i in range(TOKENS)), data
    assert deltas[-1]["finish_reason"] == "stop" and data.endswith(DONE), data
    return data


async def back_after(api: httpx.AsyncClient, since: float, timeout: float = 30.0) -> float:
    """Seconds from ``since`` until a new request is answered 200: a new attempt every
    ``PROBE_EVERY`` seconds, each also waiting for its answer, as many clients would."""
    body = {**BODY, "stream": False, "max_tokens": 2}
    served = asyncio.Event()
    answered_at: list[float] = []

    async def attempt() -> None:
        try:
            r = await api.post("/v1/chat/completions", json=body, timeout=5.0)
        except httpx.HTTPError:
            return
        if r.status_code == 200:
            answered_at.append(time.monotonic())
            served.set()

    tasks: set[asyncio.Task[None]] = set()
    try:
        while time.monotonic() - since < timeout:
            tasks.add(asyncio.create_task(attempt()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(served.wait(), PROBE_EVERY)
            if answered_at:
                return min(answered_at) - since
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    raise AssertionError(f"no request served within {timeout} s")


async def every_broker_back(urls: list[str], since: float) -> float:
    """Seconds from ``since`` until each broker, asked directly, answers 200 again.

    Service through the load balancer comes back with the first broker that finds Redis
    (or the new master); the other may take a moment more, and a connector's upload it
    carries can fail until then. A fault's window lasts until every broker is back.
    """

    async def one(url: str) -> float:
        async with api_client(url) as direct:
            return await back_after(direct, since)

    return max(await asyncio.gather(*(one(url) for url in urls)))


def served_by(access_log: str) -> dict[str, int]:
    """x-request-id -> port of the broker that served it (the last one nginx tried)."""
    found: dict[str, int] = {}
    for line in access_log.splitlines():
        parts = line.split(" ", 1)
        if len(parts) == 2 and parts[0] != "-":
            upstreams = parts[1].rsplit(" ", 1)[0]
            last = upstreams.split(",")[-1].strip()
            if ":" in last:
                found[parts[0]] = int(last.rsplit(":", 1)[1])
    return found


def unexcused(outcomes: list[Outcome], windows: list[Window], by: dict[str, int]) -> list[Outcome]:
    """Failures no fault explains; ``short`` and ``hung`` are never excused."""
    bad = []
    for o in outcomes:
        if o.kind in ("short", "hung"):
            bad.append(o)
        elif o.kind != "whole" and not any(w.excuses(o, by) for w in windows):
            bad.append(o)
    return bad


def whole_around(outcomes: list[Outcome], windows: list[Window]) -> bool:
    """Whole answers came both before the first fault and after the last one's window."""
    first, last = min(w.start for w in windows), max(w.end for w in windows)
    whole = [o for o in outcomes if o.kind == "whole"]
    return any(o.ended < first for o in whole) and any(o.started > last for o in whole)


def report(outcomes: list[Outcome], windows: list[Window], by: dict[str, int]) -> str:
    """One line per failure with its timing relative to the first window."""
    t0 = windows[0].start if windows else 0.0
    lines = [f"{w.name}: {w.start - t0:+.2f}..{w.end - t0:+.2f} port {w.port}" for w in windows]
    for o in outcomes:
        if o.kind != "whole":
            lines.append(
                f"{o.kind} {o.started - t0:+.2f}..{o.ended - t0:+.2f} "
                f"port {by.get(o.label)}: {o.detail}"
            )
    return "\n".join(lines)
