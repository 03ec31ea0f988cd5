"""The benchmark's --server choices are the broker's, and a bad name is refused up front."""

from __future__ import annotations

from typing import get_args

from click.testing import CliRunner

from broker.settings import BrokerSettings
from shared.bench.cli import main
from shared.bench.local import DEFAULT_SERVER, SERVERS


def test_bench_servers_are_the_brokers() -> None:
    field = BrokerSettings.model_fields["server"]
    assert set(SERVERS) == set(get_args(field.annotation))
    assert DEFAULT_SERVER == field.default


def test_an_unknown_server_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["local", "--profile", "smoke", "--server", "gunicorn"])
    assert result.exit_code == 2
    assert "--server takes hypercorn, uvicorn" in result.output
