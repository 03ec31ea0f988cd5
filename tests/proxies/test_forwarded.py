"""--trusted-proxies: the logged client address comes from X-Forwarded-For only via trusted hops."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog

from broker.forwarded import client_address, parse_networks
from broker.settings import BrokerSettings
from shared.bench.upstream import FakeLLM
from shared.errors import ConfigError
from shared.settings import load_settings
from tests.proxies.relay import chat, content_of
from tests.proxies.servers import DEFAULT_LOCATION, start_nginx
from tests.support.stack import start_broker, start_connector

pytestmark = pytest.mark.both_servers  # neither server may rewrite the client address

TRUSTED = parse_networks(["10.0.0.0/8", "127.0.0.2/32", "fd00::/8"])


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("203.0.113.5", None, "203.0.113.5"),  # no header
        ("203.0.113.5", "198.51.100.7", "203.0.113.5"),  # untrusted peer: header ignored
        ("10.1.2.3", "198.51.100.7", "198.51.100.7"),  # one trusted proxy
        ("10.1.2.3", "6.6.6.6, 198.51.100.7", "198.51.100.7"),  # spoofed left part ignored
        ("10.1.2.3", "198.51.100.7, 10.9.9.9", "198.51.100.7"),  # two trusted hops
        ("10.1.2.3", "10.4.4.4, 10.9.9.9", "10.4.4.4"),  # all trusted: the farthest
        ("10.1.2.3", "garbage, 198.51.100.7", "198.51.100.7"),
        ("10.1.2.3", "198.51.100.7, garbage", "garbage"),  # an untrusted hop wrote it
        ("fd00::1", "2001:db8::9", "2001:db8::9"),  # IPv6
        ("::ffff:10.1.2.3", "198.51.100.7", "198.51.100.7"),  # IPv4-mapped peer
        (None, "198.51.100.7", None),
    ],
)
def test_client_address(peer: str | None, xff: str | None, expected: str | None) -> None:
    assert client_address(peer, xff, TRUSTED) == expected


def test_no_trusted_proxies_means_the_peer() -> None:
    assert client_address("10.1.2.3", "198.51.100.7", ()) == "10.1.2.3"


def test_setting_from_env_and_validation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REMOTELLM_BROKER_TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.2")
    settings = load_settings(BrokerSettings, None, {"data_dir": str(tmp_path)})
    assert settings.trusted_proxies == ["10.0.0.0/8", "127.0.0.2"]
    monkeypatch.setenv("REMOTELLM_BROKER_TRUSTED_PROXIES", "10.0.0.0/33")
    with pytest.raises(ConfigError, match="trusted-proxies"):
        load_settings(BrokerSettings, None, {"data_dir": str(tmp_path)})


async def test_broker_logs_the_client_behind_a_trusted_nginx(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    # nginx connects to the broker from 127.0.0.2 (trusted); API users come from 127.0.0.1.
    broker = await start_broker(tmp_path / "b", trusted_proxies=["127.0.0.2/32"])
    nginx = start_nginx(
        broker.settings.port,
        DEFAULT_LOCATION
        + "\n            proxy_bind 127.0.0.2;"
        + "\n            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
    )
    conn = await start_connector(broker.url, fake_llm.url)
    try:
        with structlog.testing.capture_logs() as logs:
            # A user behind nginx claims to be 203.0.113.9; nginx appends the real 127.0.0.1.
            via_nginx = await chat(nginx.url, headers={"X-Forwarded-For": "203.0.113.9"})
            # The same claim made directly to the broker (an untrusted peer) is ignored too.
            direct = await chat(broker.url, headers={"X-Forwarded-For": "203.0.113.9"})
        assert content_of(via_nginx) and content_of(direct)
        done = [e for e in logs if e["event"] == "request_done"]
        assert [e["client"] for e in done] == ["127.0.0.1", "127.0.0.1"]
    finally:
        await conn.stop()
        nginx.stop()
        await broker.stop()
