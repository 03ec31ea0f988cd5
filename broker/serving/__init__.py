"""The HTTP server behind the broker's two ports, chosen by ``--server``.

``BrokerServer`` (broker/server.py) owns start, drain and stop once; a server module only
turns a ``Listen`` (what one port must do) into a running server that returns when its
shutdown trigger fires. ``hypercorn`` (the default: HTTP/1.1 and HTTP/2) and ``uvicorn``
(HTTP/1.1 parsed in C by httptools) keep the same behaviour: backlog, TLS, no Server
header, no access log, a head timeout against slow-loris, a bound on silence while a
request is in flight, a bounded request head, a graceful close of what is in flight.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from broker.asgi import ASGIApp
from broker.settings import BrokerSettings

ShutdownTrigger = Callable[[], Awaitable[object]]

# Seconds a server lets requests in flight finish after its shutdown trigger fires (the
# broker has drained its relay before that: docs/architecture.md).
GRACEFUL_TIMEOUT = 5.0
# The largest request head either server reads (Hypercorn's h11 default): past it, 431.
MAX_HEAD_BYTES = 16 * 1024


@dataclass(frozen=True)
class Listen:
    """What one port must do, whichever server serves it."""

    host: str
    port: int
    # A connection must send a complete request head within this, counted from accept and
    # from the end of the previous response; bytes of a partial head do not extend it.
    header_timeout: float
    # Seconds of silence from the client allowed while a request is in flight.
    read_timeout: float
    backlog: int
    certfile: Path | None = None
    keyfile: Path | None = None

    @property
    def bind(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def listen_for(host: str, port: int, settings: BrokerSettings, tls: bool) -> Listen:
    """The API/relay port (``tls=True``) or the health port (``tls=False``).

    On the health port a request is answered at once; on the API port a client legitimately
    sends nothing while it waits up to ``--total-timeout`` for its answer.
    """
    silence = settings.total_timeout + settings.header_timeout if tls else settings.header_timeout
    with_tls = tls and settings.certfile is not None and settings.keyfile is not None
    return Listen(
        host=host,
        port=port,
        header_timeout=settings.header_timeout,
        read_timeout=int(silence) + 1,
        # A burst of 1,000 new API clients overflows Hypercorn's default backlog of 100.
        backlog=settings.backlog,
        certfile=settings.certfile if with_tls else None,
        keyfile=settings.keyfile if with_tls else None,
    )


class Serve(Protocol):
    """Serve ``app`` on ``listen`` until ``shutdown_trigger`` returns, then close gracefully.

    A bind failure raises (OSError) from here."""

    def __call__(
        self, app: ASGIApp, listen: Listen, shutdown_trigger: ShutdownTrigger
    ) -> Coroutine[Any, Any, None]: ...


def server_named(name: str) -> Serve:
    """The serve function of ``--server`` (imported only when chosen)."""
    if name == "uvicorn":
        from broker.serving import uvicorn

        return uvicorn.serve
    from broker.serving import hypercorn

    return hypercorn.serve
