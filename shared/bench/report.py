"""The benchmark's table: relay vs direct, with ratios in every row."""

from __future__ import annotations

from shared.bench.local import Row


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
                name=s.name,
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
