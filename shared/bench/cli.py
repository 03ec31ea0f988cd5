"""``remotellm-bench``: ``local`` (relay vs direct on loopback) and ``target`` (a deployment)."""

from __future__ import annotations

import asyncio
import json
import platform
from dataclasses import replace
from pathlib import Path

import click

from shared.bench.brokers import brokers_table, run_brokers
from shared.bench.hops import hop_table
from shared.bench.local import PROFILES, SERVERS, Scenario, run_profile
from shared.bench.peer import PEERS, PeerOptions
from shared.bench.report import peer_table, scaling_lines, table
from shared.bench.target import run_target, target_table


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Measure what RemoteLLM adds over a direct connection to the LLM."""


@main.command()
@click.option(
    "--profile",
    type=click.Choice(sorted(PROFILES)),
    default="standard",
    show_default=True,
    help="Which set of scenarios to run (smoke takes seconds, standard a few minutes; "
    "versus is issue 9's side by side, for --peer).",
)
@click.option("--only", multiple=True, help="Run only scenarios whose name contains this text.")
@click.option(
    "--scale", type=float, default=1.0, show_default=True, help="Multiply request counts."
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write JSON here.")
@click.option(
    "--peer",
    type=click.Choice(sorted(PEERS)),
    help="Also measure this other relay in the same run (direct / peer / ours interleaved); "
    "needs --peer-python. original: "
    + PEERS["original"].summary
    + ". Its code is not part of RemoteLLM: fetch and install it yourself.",
)
@click.option(
    "--peer-python",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Python of the venv the peer is installed in (e.g. /work/peer-venv/bin/python).",
)
@click.option(
    "--peer-src",
    type=click.Path(path_type=Path, file_okay=False),
    help="Run the peer from this source checkout (its src/ goes on PYTHONPATH) instead of "
    "the copy installed in --peer-python's venv, which still provides its dependencies.",
)
@click.option(
    "--server",
    "servers",
    default="hypercorn",
    show_default=True,
    help="Our broker's HTTP server (--server), or several comma-separated "
    "(hypercorn,uvicorn): every scenario runs on each in turn, one row per server.",
)
@click.option(
    "--trace",
    is_flag=True,
    help="Run the broker and connectors with --trace-hops and print, per scenario, the "
    "median time of each hop of the first byte (best at one stream: --only ttfb).",
)
def local(
    profile: str,
    only: tuple[str, ...],
    scale: float,
    json_path: Path | None,
    peer: str | None,
    peer_python: Path | None,
    peer_src: Path | None,
    servers: str,
    trace: bool,
) -> None:
    """Start a fake upstream, a broker and connectors on 127.0.0.1 and compare the same
    workload direct and relayed, interleaved in one run."""
    peer_options = _peer_options(peer, peer_python, peer_src)
    server_names = _servers(servers)
    scenarios = PROFILES[profile]
    if only:
        scenarios = [s for s in scenarios if any(o in s.name for o in only)]
    if scale != 1.0:
        scenarios = [replace(s, requests=max(s.rounds, int(s.requests * scale))) for s in scenarios]
    against = f", against {peer}" if peer else ""
    click.echo(f"remotellm-bench local: {len(scenarios)} scenarios ({profile}{against})")
    rows = asyncio.run(run_profile(scenarios, peer=peer_options, servers=server_names, trace=trace))
    click.echo("")
    click.echo(table(rows))
    for row in rows:
        if row.hops:
            direct = row.direct.pct("ttfb", 0.5)
            click.echo("\n" + hop_table(f"{row.scenario.name} (ours)", row.hops, direct))
    if peer_options is not None:
        click.echo(f"\nSide by side with {peer} (peer first, ours last in every a / b cell):\n")
        click.echo(peer_table(rows))
        scaling = scaling_lines(rows)
        if scaling:
            click.echo("\nCost per relayed chunk as concurrency grows:\n")
            click.echo("\n".join(scaling))
    if json_path is not None:
        payload = {
            "machine": {"python": platform.python_version(), "platform": platform.platform()},
            "profile": profile,
            "servers": list(server_names),
            "peer": None if peer_options is None else _peer_info(peer_options),
            "rows": [row.summary() for row in rows],
        }
        json_path.write_text(json.dumps(payload, indent=2, default=str))
        click.echo(f"\nJSON written to {json_path}")


def _servers(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    known = SERVERS
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise click.UsageError(f"--server takes {', '.join(known)} (comma-separated)")
    return list(dict.fromkeys(names))


def _peer_options(peer: str | None, python: Path | None, src: Path | None) -> PeerOptions | None:
    if peer is None:
        if python is not None or src is not None:
            raise click.UsageError("--peer-python and --peer-src need --peer")
        return None
    if python is None:
        raise click.UsageError(f"--peer {peer} needs --peer-python (the venv it is installed in)")
    options = PeerOptions(peer, python, src)
    problem = options.problem()
    if problem is not None:
        raise click.UsageError(problem)
    return options


def _peer_info(options: PeerOptions) -> dict[str, str | None]:
    return {
        "name": options.name,
        "summary": options.spec.summary,
        "python": str(options.python),
        "src": None if options.src is None else str(options.src),
    }


@main.command()
@click.option("--base-url", required=True, help="OpenAI base URL, e.g. https://llm.example.com/v1")
@click.option(
    "--api-key", required=True, envvar="OPENAI_API_KEY", help="API key (or OPENAI_API_KEY)."
)
@click.option("--model", required=True, help="Model to request.")
@click.option("--requests", "count", type=int, default=20, show_default=True)
@click.option("--concurrency", type=int, default=4, show_default=True)
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--prompt", default="Count from 1 to 100.", show_default=True)
@click.option(
    "--timeout", type=float, default=300.0, show_default=True, help="Seconds per request."
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write JSON here.")
def target(
    base_url: str,
    api_key: str,
    model: str,
    count: int,
    concurrency: int,
    max_tokens: int,
    prompt: str,
    timeout: float,
    json_path: Path | None,
) -> None:
    """Load-test an OpenAI-compatible endpoint: TTFT, inter-token latency, tokens/s, errors."""
    summary = asyncio.run(
        run_target(base_url, api_key, model, count, concurrency, max_tokens, prompt, timeout)
    )
    click.echo(target_table(summary))
    if json_path is not None:
        json_path.write_text(json.dumps(summary, indent=2))


@main.command()
@click.option("--concurrency", type=int, default=60, show_default=True)
@click.option("--requests", "count", type=int, default=300, show_default=True)
@click.option("--chunks", type=int, default=100, show_default=True, help="Chunks per answer.")
@click.option(
    "--delay-ms", type=float, default=5.0, show_default=True, help="Upstream pause per chunk."
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write JSON here.")
def brokers(
    concurrency: int, count: int, chunks: int, delay_ms: float, json_path: Path | None
) -> None:
    """Several brokers on one local redis-server: throughput with 1, 2 and 3 brokers, and
    what the Redis relay state adds over the in-memory one (docs/scale-out.md)."""
    scenario = Scenario("brokers", concurrency, count, chunks, delay_ms=delay_ms)
    click.echo(
        f"remotellm-bench brokers: {count} streams of {chunks} chunks, {concurrency} at once"
    )
    rows = asyncio.run(run_brokers(scenario))
    click.echo("")
    click.echo(brokers_table(rows))
    if json_path is not None:
        payload = {
            "machine": {"python": platform.python_version(), "platform": platform.platform()},
            "scenario": {"concurrency": concurrency, "requests": count, "chunks": chunks,
                         "delay_ms": delay_ms},
            "rows": [row.summary() for row in rows],
        }  # fmt: skip
        json_path.write_text(json.dumps(payload, indent=2))
        click.echo(f"\nJSON written to {json_path}")
