"""The connector's main loop: register, keep one long-poll outstanding, serve, drain.

``Connector`` has ``run`` (until stopped) and ``request_stop`` (graceful: stop taking new
work, finish in-flight requests within the drain timeout, deregister). It wires the parts,
each with one job:

- ``session.SessionKeeper``: registration (modes from ``probing.PathProbe``), the session's
  multiplexed upload, its loss and its end;
- ``capacity.CapacityWatch`` and ``models.ModelWatch``: what the connector offers;
- ``polling.Poller``: the one long-poll; ``serving.Serving``: one task per request;
- ``trouble``: the waits and warnings after failures;
- ``status.StatusBoard``: the status, derived from the events the others emit.
"""

from __future__ import annotations

import asyncio
import contextlib

from connector import capacity
from connector.broker_client import BrokerClient
from connector.capacity import Capacity, CapacityWatch
from connector.engine import detect_engine
from connector.errors import BrokerRejected, BrokerUnavailable, SessionLost, SessionReplaced
from connector.models import ModelWatch
from connector.mux import MuxUploader
from connector.polling import Poller
from connector.probing import PathProbe
from connector.serving import Serving
from connector.session import SessionKeeper
from connector.settings import ConnectorSettings
from connector.status import Status, StatusBoard
from connector.trouble import ClashWarner, Retries, clash_pause
from connector.upstream import Upstream
from shared.hoptrace import HopTrace
from shared.logging import get_logger

log = get_logger("connector.runner")

CAPACITY_PROBE_TIMEOUT = 2.0  # seconds for each question to the engine about its slots


class Connector:
    def __init__(
        self,
        settings: ConnectorSettings,
        broker: BrokerClient | None = None,
        upstream: Upstream | None = None,
    ) -> None:
        self.settings = settings
        pool = capacity.pool_size(settings.capacity)
        self.broker = broker or BrokerClient(settings, connections=pool)
        self.upstream = upstream or Upstream(settings, connections=pool)
        # Per-request hop timestamps (--trace-hops, shared/hoptrace.py); None: off, free.
        trace = HopTrace("connector") if settings.trace_hops else None
        self.upstream.trace = trace
        self.board = StatusBoard()
        emit = self.board.emit
        self.probe = PathProbe(settings, self.broker)
        self.clashes = ClashWarner(settings.name)
        self.retries = Retries(emit)
        self.keeper = SessionKeeper(settings, self.broker, self.probe, self.clashes, emit, trace)
        self.capacity_watch = CapacityWatch(
            settings.capacity, self._engine_json, emit, self._capacity_changed
        )
        self.models = ModelWatch(
            settings, self.upstream, self.broker, lambda: self.board.current, emit, self.clashes
        )
        self.serving = Serving(
            self.broker, self.upstream, self.keeper, self.probe, self.clashes, emit, trace
        )
        self.poller = Poller(self.broker, self.keeper, self.probe, emit, self.serving.dispatch)
        self._stopping = asyncio.Event()
        self._draining = False

    # -- what others read -----------------------------------------------------------------

    @property
    def status(self) -> Status:
        return self.board.current

    @property
    def tasks(self) -> dict[str, asyncio.Task[None]]:
        return self.serving.tasks

    @property
    def mux(self) -> MuxUploader | None:
        return self.keeper.mux

    @property
    def capacity(self) -> Capacity:
        return self.capacity_watch.current

    @property
    def instance_id(self) -> str:
        return self.keeper.instance_id

    def forget_path(self, reason: str) -> None:
        """A failure suggests the path to the broker changed: probe again next registration."""
        self.probe.forget(reason)

    # -- lifecycle ------------------------------------------------------------------------

    def request_stop(self) -> None:
        if not self._stopping.is_set():
            log.info("connector_stopping", in_flight=len(self.tasks))
            self._stopping.set()
            if not self._draining:
                self.poller.cancel()

    async def run(self) -> None:
        refresher = asyncio.create_task(self._refresh_models())
        try:
            await self._serve_until_stopped()
            await self._drain()
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            await self.broker.aclose()
            await self.upstream.aclose()
            log.info("connector_stopped", served=self.status.served)

    async def _serve_until_stopped(self) -> None:
        while not self._stopping.is_set():
            try:
                if self.keeper.renewal_wanted:
                    await self.keeper.renew()
                if self.keeper.session is None:
                    await self._register()
                await self.poller.poll_once()
                self.retries.reset()
            except SessionReplaced:
                self.clashes.warn("poll")
                self.keeper.lose()
                await self._pause(clash_pause())
            except SessionLost:
                log.info("session_lost", session=self.status.session_id)
                self.keeper.lose()
            except (BrokerUnavailable, BrokerRejected) as exc:
                await self._pause(self.retries.after(exc))
            except asyncio.CancelledError:
                if self._stopping.is_set():
                    continue
                if not self.keeper.renewal_wanted:
                    raise

    async def _register(self) -> None:
        models = await self.models.current()
        if not self.capacity.detected:
            await self.capacity_watch.detect()
        engine = await detect_engine(self.upstream)
        self.upstream.engine = engine
        await self.keeper.register(models, self.capacity, engine)
        self.retries.reset()

    async def _pause(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)

    # -- capacity and models --------------------------------------------------------------

    async def _engine_json(self, path: str) -> object:
        return await self.upstream.get_json(path, timeout=CAPACITY_PROBE_TIMEOUT)

    def _capacity_changed(self) -> None:
        if self.keeper.session is not None:
            # The broker knows only what we registered with: register again.
            self.keeper.renewal_wanted = True
            self.poller.cancel()

    async def _refresh_models(self) -> None:
        """Keep the served models (and an undetected capacity) current with the LLM."""
        while True:
            await asyncio.sleep(self.models.refresh_wait(self.capacity.detected))
            if self._draining:
                continue
            if not self.capacity.detected:
                await self.capacity_watch.detect()
            await self.models.update(lambda: self.keeper.session)

    # -- drain ----------------------------------------------------------------------------

    async def _drain(self) -> None:
        """Graceful stop: no new work, finish what runs (bounded), deregister.

        The session stays and keeps polling with no models routed to it, so cancels for the
        requests still running reach us while they finish.
        """
        self._draining = True
        session = self.keeper.session
        if session is not None and self.tasks:
            log.info("draining", in_flight=len(self.tasks))
            poller: asyncio.Task[None] | None = None
            with contextlib.suppress(BrokerUnavailable, BrokerRejected, SessionLost):
                await self.broker.update_models(session.session_id, [])
                poller = asyncio.create_task(self.poller.poll_while_draining())
            await self.serving.finish(self.settings.drain_timeout)
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            if self.tasks:
                log.warning("drain_timeout", cancelled=len(self.tasks))
                await self.serving.cancel_all()
        await self.keeper.close()
