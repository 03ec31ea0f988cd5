"""Fixtures for the proxy tests: real squid, nginx and mitmproxy processes on 127.0.0.1.

Every test starts from an environment without proxy or CA variables (a developer's
HTTPS_PROXY must not leak in); a test that wants them sets them itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.proxies.measure import latency_table
from tests.proxies.servers import VERSIONS

_ENV = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    rows = latency_table()
    if not rows and not VERSIONS:
        return
    terminalreporter.section("proxies: versions and stream latency")
    for name, version in sorted(VERSIONS.items()):
        terminalreporter.write_line(f"{name}: {version}")
    for row in rows:
        terminalreporter.write_line(row)
