"""The side-by-side benchmark's options and tables (no processes: rows are built by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from shared.bench.cli import main
from shared.bench.client import Result
from shared.bench.local import PROFILES, Relayed, Row, Scenario, Side
from shared.bench.peer import PEERS, PeerOptions, PeerPorts
from shared.bench.report import peer_table, scaling_lines


def _side(ttfb_ms: float, requests: int, chunks: int, wall: float, errors: int = 0) -> Side:
    ok = [Result(True, 200, ttfb_ms / 1000, 0.1, 100, chunks) for _ in range(requests)]
    bad = [Result(False, 0, 0.0, 0.0, 0, 0, "ReadError: reset") for _ in range(errors)]
    return Side(results=ok + bad, wall=wall)


def _row(conc: int, peer_cpu: float, ours_cpu: float, ours_errors: int = 0) -> Row:
    s = Scenario(f"c{conc}", concurrency=conc, requests=10, chunks=20, delay_ms=50)
    return Row(
        scenario=s,
        direct=_side(1.0, 10, 20, 1.0),
        ours=Relayed("ours", _side(4.0, 10, 20, 2.0, ours_errors), ours_cpu, ours_cpu, 100, 90),
        peers=[Relayed("original", _side(3.0, 10, 20, 1.6), peer_cpu, peer_cpu, 88, 65)],
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--peer", "original"], "--peer original needs --peer-python"),
        (["--peer-python", sys.executable], "--peer-python and --peer-src need --peer"),
        (["--peer", "original", "--peer-python", "/nonexistent/python"], "does not exist"),
        # Our own venv has no copy of the original: the error says how to install one.
        (["--peer", "original", "--peer-python", sys.executable], "cannot import the original"),
    ],
)
def test_peer_options_refused_with_the_fix(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["local", "--profile", "smoke", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_peer_src_goes_on_pythonpath(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    options = PeerOptions("original", Path(sys.executable), tmp_path)
    assert options.env() == {"PYTHONPATH": str(tmp_path / "src")}
    assert PeerOptions("original", Path(sys.executable)).env() == {}


def test_original_peer_runs_on_loopback_against_our_upstream(tmp_path: Path) -> None:
    spec, ports = PEERS["original"], PeerPorts(upstream=1, broker=2, health=3)
    broker = spec.broker_args(ports)
    assert broker[broker.index("--host") + 1] == "127.0.0.1"
    assert broker[broker.index("--health-port") + 1] == "3"
    connector = spec.connector_args(ports, tmp_path, 0)
    assert connector[connector.index("--llm-url") + 1] == "http://127.0.0.1:1"
    assert connector[connector.index("--broker-url") + 1] == "ws://127.0.0.1:2/ws"
    assert spec.registered({"connectors_connected": 1}) == 1
    assert spec.registered("not json") == 0


def test_peer_table_puts_peer_first_ours_last_with_ratios() -> None:
    rows = [_row(50, peer_cpu=0.02, ours_cpu=0.03), _row(1000, 0.04, 0.08, ours_errors=3)]
    lines = peer_table(rows).splitlines()
    assert len(lines) == 4
    assert "original / ours" in lines[0]
    assert {line.count("|") for line in lines} == {14}
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert cells[0] == "c50"
    assert cells[2] == "20 x 50 ms"
    assert cells[4] == "+2.00 / +3.00"  # TTFB p50 added over direct's 1 ms
    assert cells[6] == "2.00 / 3.00 (1.50x)"  # broker CPU ms per request, ours/peer
    assert cells[10] == "88.0 / 100.0"
    assert lines[3].endswith("| 0 / 0 / 3 |")


def test_peer_table_empty_without_peers() -> None:
    row = _row(1, 0.01, 0.01)
    row.peers = []
    assert peer_table([row]) == ""


def test_scaling_compares_lowest_and_highest_concurrency_of_one_workload() -> None:
    lines = scaling_lines([_row(50, 0.02, 0.03), _row(1000, 0.04, 0.09)])
    assert len(lines) == 2
    assert lines[0].startswith("- 20 x 50 ms, c=50 → c=1000, original:")
    # 200 chunks relayed: 0.03 s → 150 µs per chunk, 0.09 s → 450 µs (3x).
    assert "broker 150.0 → 450.0 µs (3.00x)" in lines[1]


def test_versus_profile_has_issue_9_scenarios() -> None:
    versus = PROFILES["versus"]
    assert any(s.concurrency == 1 and s.chunks == 200 and not s.delay_ms for s in versus)
    assert {s.concurrency for s in versus if s.delay_ms == 5} == {50, 100, 200}
    paced = {s.concurrency for s in versus if s.delay_ms == 50 and s.chunks == 20}
    assert paced == {50, 1000, 5000}
    assert all(s.upload_mode == "mux" and not s.tls for s in versus)
    # Past 1,000: every stream relayed at once (capacity above the concurrency), in one
    # burst, in processes of its own (a setup key of its own).
    (big,) = [s for s in versus if s.concurrency == 5000]
    assert big.capacity > big.concurrency and big.rounds == 1
    assert big.setup_key not in {s.setup_key for s in versus if s is not big}
