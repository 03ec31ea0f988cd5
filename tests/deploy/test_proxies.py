"""The nginx and Caddy examples: valid for the real programs, and a connector and an API
client going through them (TLS for nginx) get a streamed answer token by token."""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.bench.procs import write_self_signed
from shared.bench.upstream import FakeLLM
from tests.deploy.helpers import (
    BANNER_KEY,
    BANNER_TOKEN,
    DEPLOY,
    Proc,
    base_env,
    chat_stream,
    http_status,
    models_ready,
    run,
    running,
    start,
    wait_for,
)
from tests.support.net import free_port, free_ports

NGINX_CONF = DEPLOY / "nginx" / "remotellm.conf"
CADDYFILE = DEPLOY / "caddy" / "Caddyfile"
CHUNK_DELAY = 0.2


def nginx_site(
    tmp_path: Path, *, http_port: int, https_port: int, broker_port: int
) -> tuple[Path, Path]:
    """The example, pointed at a test certificate, free ports and the test broker."""
    cert, key = write_self_signed(tmp_path)
    text = NGINX_CONF.read_text()
    text = text.replace("/etc/letsencrypt/live/llm.example.com/fullchain.pem", str(cert))
    text = text.replace("/etc/letsencrypt/live/llm.example.com/privkey.pem", str(key))
    text = re.sub(r"^\s*listen \[::\].*\n", "", text, flags=re.M)  # IPv6 may be missing
    text = text.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    text = text.replace("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
    text = text.replace("server 127.0.0.1:8443;", f"server 127.0.0.1:{broker_port};")
    site = tmp_path / "remotellm.conf"
    site.write_text(text)
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"""
        user root;
        pid {tmp_path}/nginx.pid;
        error_log {tmp_path}/error.log;
        events {{}}
        http {{
            access_log off;
            client_body_temp_path {tmp_path}/body;
            proxy_temp_path {tmp_path}/proxy;
            include {site};
        }}
        """
    )
    return main, cert


def test_nginx_config_is_valid(tmp_path: Path) -> None:
    main, _ = nginx_site(tmp_path, http_port=80, https_port=443, broker_port=8443)
    result = run(["nginx", "-t", "-p", tmp_path, "-c", main], check=False)
    assert result.returncode == 0, result.stderr
    text = NGINX_CONF.read_text()
    relay = text[text.index("location /relay/") :]
    relay = relay[: relay.index("}")]
    assert "proxy_request_buffering off;" in relay
    assert "client_max_body_size 0;" in relay
    assert "proxy_buffering off;" in text and "proxy_http_version 1.1;" in text
    read_timeout = re.search(r"proxy_read_timeout (\d+)s;", text)
    assert read_timeout and int(read_timeout.group(1)) >= 120
    assert "X-Accel-Buffering" not in re.findall(r"proxy_ignore_headers[^;]*;", text)


def caddy_env(home: Path) -> dict[str, str]:
    """Caddy keeps its state under HOME / XDG dirs: a throwaway one."""
    return base_env(HOME=str(home), XDG_DATA_HOME=str(home), XDG_CONFIG_HOME=str(home))


def test_caddyfile_is_valid(tmp_path: Path) -> None:
    result = run(
        ["caddy", "validate", "--config", CADDYFILE, "--adapter", "caddyfile"],
        check=False,
        env=caddy_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "flush_interval -1" in CADDYFILE.read_text()


@pytest.fixture(scope="module")
def slow_llm() -> Iterator[FakeLLM]:
    fake = FakeLLM(models=["slow-model"], chunk_delay=CHUNK_DELAY)
    fake.start_in_thread()
    yield fake
    fake.stop_in_thread()


def start_broker(wheel_venv: Path, logs: Path) -> tuple[Proc, int, int]:
    port, health = free_ports(2)
    broker = start(
        "broker",
        [
            wheel_venv / "bin" / "remotellm-broker",
            *("--host", "127.0.0.1", "--port", str(port), "--health-port", str(health)),
            *("--data-dir", str(logs / "data")),
        ],
        logs,
        base_env(PYTHONUNBUFFERED="1"),
    )
    return broker, port, health


def relay_through(
    proxy: Proc, broker: Proc, health: int, url: str, wheel_venv: Path, slow_llm: FakeLLM,
    logs: Path, **tls: object,
) -> None:  # fmt: skip
    """Connector and API client both reach the broker only through the proxy at ``url``."""
    procs = [broker, proxy]
    wait_for("/ready", lambda: http_status(f"http://127.0.0.1:{health}/ready") == 200, procs)
    key = wait_for("key", lambda: BANNER_KEY.search(broker.stdout()), procs).group(1)
    token = wait_for("token", lambda: BANNER_TOKEN.search(broker.stdout()), procs).group(1)
    extra = ["--ca-bundle", str(tls["ca"])] if "ca" in tls else []
    connector = start(
        "connector",
        [
            wheel_venv / "bin" / "remotellm-connector",
            *("--broker-url", url, "--broker-token", token, "--llm-url", slow_llm.url),
            *extra,
        ],
        logs,
        base_env(PYTHONUNBUFFERED="1"),
    )
    procs.append(connector)
    kwargs: dict[str, object] = {}
    if "ca" in tls:
        kwargs["verify"] = ssl.create_default_context(cafile=str(tls["ca"]))
    with running([connector]):
        wait_for("the model", lambda: models_ready(url, key, slow_llm.model, **kwargs), procs)
        text, arrivals = chat_stream(url, key, slow_llm.model, **kwargs)
        assert text == slow_llm.answer
        # Token by token: the chunks arrive spread out as the LLM writes them, not in one go.
        spread = arrivals[-1] - arrivals[0]
        assert spread >= CHUNK_DELAY * (len(slow_llm.words) - 1) * 0.6, arrivals
    assert connector.popen.returncode == 0, connector.output()


def test_relay_through_nginx(tmp_path: Path, wheel_venv: Path, slow_llm: FakeLLM) -> None:
    http_port, https_port = free_ports(2)
    broker, port, health = start_broker(wheel_venv, tmp_path)
    main, cert = nginx_site(tmp_path, http_port=http_port, https_port=https_port, broker_port=port)
    nginx = start(
        "nginx", ["nginx", "-p", tmp_path, "-c", main, "-g", "daemon off;"], tmp_path, base_env()
    )
    with running([broker, nginx]):
        url = f"https://127.0.0.1:{https_port}"
        relay_through(nginx, broker, health, url, wheel_venv, slow_llm, tmp_path, ca=cert)
        assert http_status(f"http://127.0.0.1:{http_port}/v1/models") == 301


def test_relay_through_caddy(tmp_path: Path, wheel_venv: Path, slow_llm: FakeLLM) -> None:
    caddy_port = free_port()
    broker, port, health = start_broker(wheel_venv, tmp_path)
    text = CADDYFILE.read_text()
    text = text.replace("llm.example.com {", f"http://127.0.0.1:{caddy_port} {{")
    text = text.replace("reverse_proxy 127.0.0.1:8443", f"reverse_proxy 127.0.0.1:{port}")
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text("{\n\tadmin off\n}\n\n" + text)
    caddy = start(
        "caddy",
        ["caddy", "run", "--config", caddyfile, "--adapter", "caddyfile"],
        tmp_path,
        caddy_env(tmp_path),
    )
    with running([broker, caddy]):
        url = f"http://127.0.0.1:{caddy_port}"
        relay_through(caddy, broker, health, url, wheel_venv, slow_llm, tmp_path)
