"""Enrollment: a connector without a token asks the broker to join and waits for approval.

It sends its name, models and a random secret to ``POST /relay/v1/enroll`` and asks again
every few seconds (the broker says how often) until the operator decides on
``/portal/admin``. The secret is kept in ``<data-dir>/enrollment-secret`` (mode 600) while
it waits, so a restarted connector finds its own pending request instead of making a new
one. On approval the broker sends the connector's token once: it goes to
``<data-dir>/credentials`` (mode 600), the secret file is removed, and the connector then
registers like any other. A rejected or revoked connector, or a broker without
``--allow-enrollment``, ends with ``EnrollmentRefused`` (the CLI exits 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from pathlib import Path

from connector.backoff import Backoff
from connector.broker_client import BrokerClient
from connector.errors import BrokerRejected, BrokerUnavailable
from connector.models import servable
from connector.session import VERSION
from connector.settings import ConnectorSettings, read_token_file
from connector.upstream import Upstream, UpstreamError
from shared.files import write_atomic
from shared.fingerprint import fingerprint
from shared.logging import get_logger
from shared.protocol import EnrollRequest

log = get_logger("connector.enroll")

SECRET_FILE = "enrollment-secret"
BUSY_RETRY = 10.0  # seconds to wait after the broker said it is busy (429 / 503)


def write_private(path: Path, text: str) -> None:
    """Write a secret file durably, mode 600, in a directory only we can read."""
    write_atomic(path, text + "\n")


def enrollment_secret(settings: ConnectorSettings) -> str:
    """This connector's enrollment secret: the one kept from an earlier try, or a new one."""
    path = settings.data_dir / SECRET_FILE
    with contextlib.suppress(ValueError):
        return read_token_file(path)
    secret = secrets.token_hex(32)
    write_private(path, secret)
    return secret


async def _models(settings: ConnectorSettings) -> list[str]:
    if settings.models:
        return servable(list(settings.models))
    upstream = Upstream(settings, connections=1)
    try:
        return servable(await upstream.models())
    except UpstreamError as exc:
        log.warning("model_discovery_failed", error=str(exc))
        return []  # the operator sees none yet; registration discovers them again
    finally:
        await upstream.aclose()


async def enroll(
    settings: ConnectorSettings,
    stop: asyncio.Event | None = None,
    client: BrokerClient | None = None,
) -> str | None:
    """Ask until the operator approves; the token (saved), or None when stopped first."""
    stop = stop or asyncio.Event()
    secret = enrollment_secret(settings)
    req = EnrollRequest(
        name=settings.name, models=await _models(settings), version=VERSION, secret=secret
    )
    own = client is None
    broker = client or BrokerClient(settings, connections=1)
    backoff = Backoff()
    announced = ""
    try:
        while not stop.is_set():
            try:
                reply = await broker.enroll(req)
            except (BrokerUnavailable, BrokerRejected) as exc:
                busy = isinstance(exc, BrokerUnavailable) and exc.status in (429, 503)
                delay = BUSY_RETRY if busy else backoff.next_delay()
                log.warning("enroll_retry", error=str(exc), retry_in_s=round(delay, 2))
                await _wait(stop, delay)
                continue
            backoff.reset()
            if reply.token is not None:
                write_private(settings.credentials_path, reply.token)
                (settings.data_dir / SECRET_FILE).unlink(missing_ok=True)
                log.info(
                    "enrolled",
                    enrollment=reply.enrollment_id,
                    credentials=str(settings.credentials_path),
                )
                return reply.token
            if announced != reply.enrollment_id:
                announced = reply.enrollment_id
                log.warning(
                    "waiting_for_approval",
                    enrollment=reply.enrollment_id,
                    name=settings.name,
                    models=req.models,
                    fingerprint=fingerprint(secret),
                    message=f"ask an admin to approve {settings.name!r} with fingerprint "
                    f"{fingerprint(secret)} at {settings.broker_url}/portal/admin/connectors",
                )
            await _wait(stop, reply.retry_after_s)
        return None
    finally:
        if own:
            await broker.aclose()


async def _wait(stop: asyncio.Event, delay: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)


async def enrolled_settings(
    settings: ConnectorSettings, stop: asyncio.Event | None = None
) -> ConnectorSettings | None:
    """``settings`` with a token: as given, or from enrollment (None when stopped first)."""
    if settings.broker_token is not None:
        return settings
    log.info("enrolling", broker_url=settings.broker_url, name=settings.name)
    token = await enroll(settings, stop)
    if token is None:
        return None
    return settings.model_copy(update={"broker_token": token})
