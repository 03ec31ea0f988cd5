"""The benchmark's smoke profile runs end to end and prints a well-formed table.

No timing is asserted: speed is measured by the benchmark, not by tests.
"""

from __future__ import annotations

import json

from click.testing import CliRunner

from shared.bench.cli import main
from shared.bench.hops import BESIDE, PATH


def test_bench_smoke_profile_table_and_json(tmp_path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["local", "--profile", "smoke", "--json", str(out)])
    assert result.exit_code == 0, result.output
    table = [line for line in result.output.splitlines() if line.startswith("|")]
    assert table[0].startswith("| scenario | conc | mode | TTFB p50")
    assert len(table) == 2 + 3  # header, rule, one row per smoke scenario
    widths = {line.count("|") for line in table}
    assert widths == {13}
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 3
    for row in data["rows"]:
        assert row["relay"]["errors"] == 0
        assert row["direct"]["errors"] == 0
        assert row["relay"]["chunks_per_s"] > 0
        assert row["broker_peak_rss_mib"] > 0
        assert "x" in table[2] or "-" in table[2]


def test_bench_trace_prints_every_hop_of_the_first_byte(tmp_path) -> None:
    """--trace: the broker, connector and fake LLM log their marks; the bench joins them
    with the client's by x-request-id and prints one row per hop, each measured."""
    out = tmp_path / "bench.json"
    args = ["local", "--profile", "smoke", "--only", "ttfb", "--trace", "--json", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "Hops of the first byte, ttfb (ours)" in result.output
    (row,) = json.loads(out.read_text())["rows"]
    hops = row["hops_ms"]
    expected = [hop for hop, _, _ in PATH[1:]] + ["total"] + [hop for hop, _, _ in BESIDE]
    assert list(hops) == expected
    # Every hop was marked in every request (a missing mark would make its median NaN).
    assert all(value == value for value in hops.values())
    assert hops["total"] > 0
