"""The benchmark's table: relay vs direct, with ratios in every row."""

from __future__ import annotations

from shared.bench.local import Relayed, Row, Scenario


def _f(value: float, digits: int = 2) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:.{digits}f}"


def table(rows: list[Row]) -> str:
    columns = [
        "scenario",
        "conc",
        "mode",
        "TTFB p50 direct / relay ms (+added)",
        "TTFB p99 direct / relay ms",
        "TTLB p50 direct / relay ms",
        "chunks/s direct / relay (ratio)",
        "req/s relay",
        "broker µs/chunk",
        "connector µs/chunk",
        "errors direct / relay",
        "peak RSS broker / connector MiB",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        s = row.scenario
        data = row.summary()
        d, r = row.direct, row.relay
        ratio = data["throughput_ratio"]
        template = (
            "| {name} | {conc} | {mode}{conns} | {d50} / {r50} (+{add}) | {d99} / {r99} "
            "| {dl} / {rl} | {dc:.0f} / {rc:.0f} ({ratio}) | {rq:.1f} | {bu} | {cu} "
            "| {de} / {re} | {brss} / {crss} |"
        )
        lines.append(
            template.format(
                name=row.label,
                conc=s.concurrency,
                mode=s.upload_mode,
                conns=f" x{s.connectors}" if s.connectors > 1 else "",
                d50=_f(d.pct("ttfb", 0.5)),
                r50=_f(r.pct("ttfb", 0.5)),
                add=_f(r.pct("ttfb", 0.5) - d.pct("ttfb", 0.5)),
                d99=_f(d.pct("ttfb", 0.99)),
                r99=_f(r.pct("ttfb", 0.99)),
                dl=_f(d.pct("ttlb", 0.5)),
                rl=_f(r.pct("ttlb", 0.5)),
                dc=d.chunks_per_s,
                rc=r.chunks_per_s,
                ratio=f"{ratio:.2f}x" if isinstance(ratio, float) else "-",
                rq=r.req_per_s,
                bu=_f(float(data["broker_us_per_chunk"]), 1),  # type: ignore[arg-type]
                cu=_f(float(data["connector_us_per_chunk"]), 1),  # type: ignore[arg-type]
                de=d.errors,
                re=r.errors,
                brss=_f(row.broker_rss_mib, 1),
                crss=_f(row.connector_rss_mib, 1),
            )
        )
    return "\n".join(lines)


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs > 0 else "-"


def _pacing(s: Scenario) -> str:
    pace = f"{s.delay_ms:g} ms" if s.delay_ms else "unpaced"
    return f"{s.chunks} x {pace}"


def peer_table(rows: list[Row]) -> str:
    """Direct, the peer(s) and ours side by side: one row per scenario that ran a peer.

    Every "a / b" cell lists the peers first, ours last; "ours/peer" is ours divided by the
    (first) peer, so below 1.00x means ours is cheaper or faster.
    """
    rows = [row for row in rows if row.peers]
    if not rows:
        return ""
    names = " / ".join([p.name for p in rows[0].peers] + ["ours"])
    columns = [
        "scenario",
        "conc",
        "chunks x pacing",
        "TTFB p50 direct ms",
        f"TTFB p50 added ms {names}",
        f"chunks/s direct / {names}",
        f"broker CPU ms/req {names} (ours/peer)",
        f"connector CPU ms/req {names} (ours/peer)",
        f"broker µs/chunk {names}",
        f"connector µs/chunk {names}",
        f"peak RSS broker MiB {names}",
        f"peak RSS connector MiB {names}",
        f"errors direct / {names}",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_peer_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def _peer_cells(row: Row) -> list[str]:
    relays = [*row.peers, row.ours]
    cost = {r.name: r.cost() for r in relays}
    peer, ours = cost[row.peers[0].name], cost["ours"]

    def metric(key: str, digits: int = 2) -> str:
        return " / ".join(_f(cost[r.name][key], digits) for r in relays)

    def versus(key: str) -> str:
        return f"{metric(key)} ({_ratio(ours[key], peer[key])})"

    return [
        row.label,
        str(row.scenario.concurrency),
        _pacing(row.scenario),
        _f(row.direct.pct("ttfb", 0.5)),
        " / ".join("+" + _f(row.added_ttfb_ms(r)) for r in relays),
        " / ".join(f"{side.chunks_per_s:.0f}" for side in [row.direct, *(r.side for r in relays)]),
        versus("broker_ms_per_request"),
        versus("connector_ms_per_request"),
        metric("broker_us_per_chunk", 1),
        metric("connector_us_per_chunk", 1),
        metric("broker_peak_rss_mib", 1),
        metric("connector_peak_rss_mib", 1),
        " / ".join(str(side.errors) for side in [row.direct, *(r.side for r in relays)]),
    ]


def scaling_lines(rows: list[Row]) -> list[str]:
    """Cost per relayed chunk at the lowest vs the highest concurrency of the same workload."""
    groups: dict[tuple[int, int, float, str, str], list[Row]] = {}
    for row in rows:
        s = row.scenario
        key = (s.chunks, s.chunk_bytes, s.delay_ms, s.upload_mode, row.server)
        groups.setdefault(key, []).append(row)
    lines = []
    for group in groups.values():
        if len({r.scenario.concurrency for r in group}) < 2:
            continue
        low = min(group, key=lambda r: r.scenario.concurrency)
        high = max(group, key=lambda r: r.scenario.concurrency)
        for name in [p.name for p in low.peers] + ["ours"]:
            a, b = _relayed(low, name), _relayed(high, name)
            shown = f"{name} [{low.server}]" if low.show_server and name == "ours" else name
            if a is None or b is None:
                continue
            ca, cb = a.cost(), b.cost()
            parts = [
                f"{side} {_f(ca[f'{side}_us_per_chunk'], 1)} → "
                f"{_f(cb[f'{side}_us_per_chunk'], 1)} µs "
                f"({_ratio(cb[f'{side}_us_per_chunk'], ca[f'{side}_us_per_chunk'])})"
                for side in ("broker", "connector")
            ]
            lines.append(
                f"- {_pacing(low.scenario)}, c={low.scenario.concurrency} → "
                f"c={high.scenario.concurrency}, {shown}: CPU per chunk " + ", ".join(parts)
            )
    return lines


def _relayed(row: Row, name: str) -> Relayed | None:
    return next((r for r in [*row.peers, row.ours] if r.name == name), None)
