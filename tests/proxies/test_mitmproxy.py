"""Scenario 2: connector -> mitmproxy (TLS interception with its own CA) -> broker over HTTPS.

mitmproxy plays the corporate TLS-inspecting proxy: it verifies the broker's real
(self-signed) certificate and shows the connector a certificate of its own CA instead.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from connector.broker_client import BrokerClient
from connector.check import Checker
from shared.bench.upstream import FakeLLM
from tests.proxies.measure import CHUNK_DELAY, StreamTiming, expected_tokens, stream_timing
from tests.proxies.relay import (
    broker_health,
    chat,
    connector_error,
    connector_settings,
    content_of,
    run_check_cli,
)
from tests.proxies.servers import (
    BrokerCert,
    ProxyProcess,
    make_broker_cert,
    mitm_ca,
    start_mitmproxy,
)
from tests.support.stack import TOKEN, RunningBroker, start_broker, start_connector

pytestmark = pytest.mark.both_servers  # TLS served by each server


@pytest.fixture(scope="module")
def broker_cert(tmp_path_factory: pytest.TempPathFactory) -> BrokerCert:
    return make_broker_cert(tmp_path_factory.mktemp("cert"))


@pytest.fixture(scope="module")
def mitm(broker_cert: BrokerCert) -> Iterator[ProxyProcess]:
    proxy = start_mitmproxy(upstream_ca=broker_cert.certfile)
    yield proxy
    proxy.stop()


async def _tls_broker(tmp_path: Path, cert: BrokerCert) -> tuple[RunningBroker, str]:
    broker = await start_broker(
        tmp_path / "b", certfile=cert.certfile, keyfile=cert.keyfile, poll_wait=5.0
    )
    return broker, f"https://127.0.0.1:{broker.settings.port}"


async def test_relay_through_tls_interception_with_ca_bundle(
    tmp_path: Path, fake_llm: FakeLLM, mitm: ProxyProcess, broker_cert: BrokerCert
) -> None:
    broker, url = await _tls_broker(tmp_path, broker_cert)
    fake_llm.chunk_delay = CHUNK_DELAY
    user_url = url  # API users reach the broker directly (they trust its certificate)
    label = "mitmproxy (TLS interception, --ca-bundle)"
    try:
        for mode, http2 in (("auto", False), ("stream", False), ("parts", False), ("auto", True)):
            conn = await start_connector(
                url,
                fake_llm.url,
                proxy=mitm.url,
                ca_bundle=mitm_ca(mitm),
                upload_mode=mode,
                http2=http2,
            )
            try:
                chosen = conn.connector.status.upload_mode
                # mitmproxy reads whole request bodies before passing them on.
                assert chosen == ("stream" if mode == "stream" else "parts")
                health = await broker_health(broker)
                assert [c["upload_mode"] for c in health["connectors"]] == [chosen]
                path = label + (" over HTTP/2" if http2 else "")
                timing = await _stream(user_url, broker_cert, path, chosen, record=mode != "auto")
                assert timing.tokens == expected_tokens()
                assert timing.incremental == (chosen == "parts"), timing
                reply = await chat(user_url, verify=str(broker_cert.certfile))
                assert content_of(reply) == "tok0 tok1 tok2 "
            finally:
                await conn.stop()
    finally:
        await broker.stop()
    # The connector's traffic really was intercepted (mitmproxy logged the decrypted calls).
    flows = mitm.log("console.log")
    assert flows.count(f"POST {url}/relay/v1/") >= 6, flows[-2000:]
    assert "HTTP/2.0" in flows  # the --http2 connector spoke HTTP/2 to the proxy


async def _stream(url: str, cert: BrokerCert, label: str, mode: str, record: bool) -> StreamTiming:
    ctx = ssl.create_default_context(cafile=str(cert.certfile))
    return await stream_timing(url, label, mode, record=record, verify=ctx)


async def test_without_the_ca_bundle_the_connector_names_the_issuer(
    tmp_path: Path,
    fake_llm: FakeLLM,
    mitm: ProxyProcess,
    broker_cert: BrokerCert,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker, url = await _tls_broker(tmp_path, broker_cert)
    try:
        # The proxy from HTTPS_PROXY (a CONNECT tunnel); no --ca-bundle, no SSL_CERT_FILE:
        # the system trust store (truststore) is used, and it does not know mitmproxy's CA.
        with monkeypatch.context() as env:
            env.setenv("HTTPS_PROXY", mitm.url)
            error = await connector_error(connector_settings(url, fake_llm.url))
        assert "TLS certificate verification failed for 127.0.0.1" in error
        assert "unable to get local issuer certificate" in error
        assert "issued by O=mitmproxy,CN=mitmproxy" in error
        assert "--ca-bundle" in error
        assert not (await broker_health(broker))["connectors"]

        # The check says it on the TLS line, with the issuer, and exits 1.
        code, out = await run_check_cli(
            "--broker-url", url, "--broker-token", TOKEN, "--llm-url", fake_llm.url,
            "--proxy", mitm.url,
        )  # fmt: skip
        assert code == 1, out
        tls_line = next(line for line in out.splitlines() if line.split()[1:2] == ["tls"])
        assert tls_line.startswith("FAIL"), out
        assert "issuer: O=mitmproxy,CN=mitmproxy" in tls_line
        assert "--ca-bundle" in tls_line
        assert "system trust store (truststore)" in out
        assert any(line.startswith("ok    tunnel") for line in out.splitlines()), out

        # With the bundle (here through SSL_CERT_FILE) every step passes.
        code, out = await run_check_cli(
            "--broker-url", url, "--broker-token", TOKEN, "--llm-url", fake_llm.url,
            "--proxy", mitm.url, SSL_CERT_FILE=str(mitm_ca(mitm)),
        )  # fmt: skip
        assert code == 0, out
        assert "issued by O=mitmproxy,CN=mitmproxy (verified)" in out
    finally:
        await broker.stop()


async def test_self_signed_broker_and_insecure(
    tmp_path: Path, fake_llm: FakeLLM, broker_cert: BrokerCert
) -> None:
    broker, url = await _tls_broker(tmp_path, broker_cert)
    try:
        # Direct to a self-signed broker: the hint says to pass that certificate.
        lines: list[str] = []
        ok = await Checker(connector_settings(url, fake_llm.url), out=lines.append).run()
        assert not ok
        tls_line = next(line for line in lines if line.split()[1:2] == ["tls"])
        assert "self-signed" in tls_line and "--ca-bundle" in tls_line, lines

        # --insecure works but never silently.
        with structlog.testing.capture_logs() as logs:
            client = BrokerClient(connector_settings(url, fake_llm.url, insecure=True))
            await client.aclose()
        warning = [e for e in logs if e["event"] == "tls_verification_disabled"]
        assert warning and warning[0]["log_level"] == "warning"
        assert "NOT verified" in warning[0]["message"]
        conn = await start_connector(url, fake_llm.url, insecure=True)
        try:
            assert content_of(await chat(url, verify=str(broker_cert.certfile)))
        finally:
            await conn.stop()
    finally:
        await broker.stop()
