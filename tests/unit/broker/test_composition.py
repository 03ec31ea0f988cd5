"""Framework defaults that would cut long generations must stay off (docs/architecture.md)."""

from __future__ import annotations

from broker.composition import create_app
from broker.serving import GRACEFUL_TIMEOUT, listen_for
from broker.serving.hypercorn import hypercorn_config
from broker.serving.uvicorn import uvicorn_config
from broker.settings import BrokerSettings


def test_no_framework_timeout_cuts_long_streams(tmp_path) -> None:
    settings = BrokerSettings(
        data_dir=tmp_path, user_api_keys=["sk-x"], connector_tokens=["ct-x"], port=1
    )
    app = create_app(settings)
    # Quart's defaults are 60 s: a long generation or upload would be cut silently.
    assert app.config["RESPONSE_TIMEOUT"] is None
    assert app.config["BODY_TIMEOUT"] is None
    # Bodies are bounded per route instead (API body limit, per-frame and response limits).
    assert app.config["MAX_CONTENT_LENGTH"] is None
    # The API port: a client may be silent while it waits for its whole answer.
    api = hypercorn_config(listen_for("127.0.0.1", 1, settings, tls=True))
    assert api.read_timeout is not None and api.read_timeout > settings.total_timeout
    # A request head must be complete within --header-timeout (slow loris), on both ports.
    health = hypercorn_config(listen_for("127.0.0.1", 1, settings, tls=False))
    assert api.keep_alive_timeout == health.keep_alive_timeout == settings.header_timeout
    assert health.read_timeout is not None and health.read_timeout <= settings.header_timeout + 1


def test_listen_backlog_comes_from_settings(tmp_path) -> None:
    base = {"data_dir": tmp_path, "user_api_keys": ["sk-x"], "connector_tokens": ["ct-x"]}
    # The default must hold a burst of 1,000 new connections (Hypercorn's own is 100).
    assert listen_for("127.0.0.1", 1, BrokerSettings(**base), tls=False).backlog == 2048
    settings = BrokerSettings(**base, backlog=4096)
    assert hypercorn_config(listen_for("127.0.0.1", 1, settings, tls=False)).backlog == 4096


def test_uvicorn_keeps_hypercorns_behaviour(tmp_path) -> None:
    for name in ("c.pem", "k.pem"):
        (tmp_path / name).write_text("not parsed here")
    settings = BrokerSettings(
        data_dir=tmp_path,
        user_api_keys=["sk-x"],
        connector_tokens=["ct-x"],
        backlog=4096,
        certfile=tmp_path / "c.pem",
        keyfile=tmp_path / "k.pem",
    )
    api = listen_for("127.0.0.1", 1, settings, tls=True)
    config = uvicorn_config(create_app(settings), api)
    assert (config.server_header, config.date_header, config.access_log) == (False, True, False)
    assert config.proxy_headers is False  # broker/forwarded.py decides whom to trust
    assert config.lifespan == "on" and config.log_config is None and config.ws == "none"
    assert config.backlog == 4096 and config.timeout_graceful_shutdown == GRACEFUL_TIMEOUT
    assert (config.ssl_certfile, config.ssl_keyfile) == (str(api.certfile), str(api.keyfile))
    protocol = config.http
    assert isinstance(protocol, type)
    assert protocol.header_timeout == settings.header_timeout
    assert protocol.read_timeout == api.read_timeout > settings.total_timeout
    health = listen_for("127.0.0.1", 1, settings, tls=False)
    assert health.certfile is None and health.read_timeout <= settings.header_timeout + 1
