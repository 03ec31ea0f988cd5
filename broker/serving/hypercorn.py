"""Serve one port with Hypercorn (HTTP/1.1, and HTTP/2 over TLS by ALPN or h2c)."""

from __future__ import annotations

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config

from broker.asgi import ASGIApp
from broker.serving import GRACEFUL_TIMEOUT, MAX_HEAD_BYTES, Listen, ShutdownTrigger


def hypercorn_config(listen: Listen) -> Config:
    """Hypercorn closes a connection whose request head is not complete within
    ``keep_alive_timeout`` (its idle timer runs from accept and between requests and is not
    reset by bytes of a partial head), so that is the header timeout; ``read_timeout``
    bounds the silence of a connection with a request in flight."""
    config = Config()
    config.bind = [listen.bind]
    config.accesslog = None
    config.errorlog = None
    config.include_server_header = False
    config.keep_alive_timeout = listen.header_timeout
    config.read_timeout = int(listen.read_timeout)
    config.graceful_timeout = GRACEFUL_TIMEOUT
    config.backlog = listen.backlog
    config.h11_max_incomplete_size = MAX_HEAD_BYTES
    if listen.certfile is not None and listen.keyfile is not None:
        config.certfile = str(listen.certfile)
        config.keyfile = str(listen.keyfile)
    return config


async def serve(app: ASGIApp, listen: Listen, shutdown_trigger: ShutdownTrigger) -> None:
    await hypercorn_serve(
        app,
        hypercorn_config(listen),
        shutdown_trigger=shutdown_trigger,
    )
