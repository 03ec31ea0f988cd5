"""The connector's main loop: register, keep one long-poll outstanding, serve, drain.

``Connector`` has ``run`` (until stopped) and ``request_stop`` (graceful: stop taking new
work, finish in-flight requests within the drain timeout, deregister).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

import structlog

from connector import capacity
from connector.backoff import Backoff
from connector.broker_client import BrokerClient
from connector.errors import (
    BrokerRejected,
    BrokerUnavailable,
    LeaseLost,
    SessionLost,
    SessionReplaced,
)
from connector.mux import MuxUploader
from connector.pipe import FramePipe
from connector.settings import ConnectorSettings
from connector.upstream import Upstream, UpstreamError
from shared import framing
from shared.logging import get_logger
from shared.model_names import split_valid
from shared.protocol import (
    PROTOCOL_REVISION,
    CancelItem,
    RefusedModel,
    RegisterRequest,
    RegisterResponse,
    Replaced,
    RequestItem,
    UploadMode,
    UploadResult,
    WorkItem,
)

log = get_logger("connector.runner")

VERSION = "0.1.0"
EMPTY_MODELS_REFRESH = 5.0  # seconds between discoveries while no model is known
PART_INTERVAL = 0.1  # seconds between parts after the first (docs/protocol.md: 100-250 ms)
# While nothing answers (the broker is down or restarting), retry at least this often: a
# refused connection is cheap, and the connector serves again soon after the broker is up.
UNREACHABLE_RETRY = 1.0
# After another process took over our name, wait this long (jittered) before taking it
# back, so two clashing connectors do not replace each other in a tight loop.
CLASH_RETRY = (2.0, 4.0)
CLASH_HINT = "pass --name to give each connector its own name"
CLASH_WARN_EVERY = 60.0  # seconds between connector_name_clash warnings while it lasts
QUIET_WARN_EVERY = 30.0  # seconds between broker_unreachable warnings after the first few
CAPACITY_PROBE_TIMEOUT = 2.0  # seconds for each question to the engine about its slots


@dataclass(frozen=True)
class PathVerdict:
    """What the probes found about the path to the broker, kept across re-registrations."""

    upload_mode: UploadMode  # what the upload probe chose
    answered_mode: UploadMode  # what the broker then granted
    stream_polls: bool


@dataclass
class Status:
    """What the health server reports."""

    session_id: str | None = None
    capacity: int = 0
    capacity_source: str = ""
    upload_mode: str | None = None
    poll_mode: str | None = None
    models: list[str] = field(default_factory=list)
    last_poll_ok: float = 0.0
    broker_error: str | None = None
    llm_ok: bool = False
    llm_error: str | None = None
    llm_checked: float = 0.0
    served: int = 0
    failed: int = 0
    reconnects: int = 0


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
        # Random per process: the broker tells our restart from a second live process.
        self.instance_id = uuid.uuid4().hex
        self.capacity = capacity.initial(settings.capacity)
        self.status = Status()
        self._show_capacity()
        self.session: RegisterResponse | None = None
        self.mux: MuxUploader | None = None  # the session's multiplexed upload, if granted
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()
        self._poll_task: asyncio.Task[object] | None = None
        self._backoff = Backoff()
        self._draining = False
        self.stream_polls = False
        self._path: PathVerdict | None = None
        self._reregister = False
        self._clash_warned: float | None = None  # when connector_name_clash was last logged
        self._clashes = 0
        self._cut_seen = False  # the last streaming poll was cut short
        self._warned_at = 0.0  # when broker_unreachable was last logged as a warning

    # -- lifecycle ------------------------------------------------------------------------

    def request_stop(self) -> None:
        if not self._stopping.is_set():
            log.info("connector_stopping", in_flight=len(self.tasks))
            self._stopping.set()
            if self._poll_task is not None and not self._draining:
                self._poll_task.cancel()

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
                if self._reregister:
                    await self._renew_session()
                if self.session is None:
                    await self._register()
                await self._poll_once()
                self._backoff.reset()
            except SessionReplaced:
                self._warn_clash("poll")
                self._lose_session()
                await self._pause(random.uniform(*CLASH_RETRY))
            except SessionLost:
                log.info("session_lost", session=self.status.session_id)
                self._lose_session()
            except (BrokerUnavailable, BrokerRejected) as exc:
                await self._broker_trouble(exc)
            except asyncio.CancelledError:
                if self._stopping.is_set():
                    continue
                if not self._reregister:
                    raise

    async def _renew_session(self) -> None:
        """Register again (the capacity changed): end our old session first, so the broker
        sees a goodbye rather than two registrations of one name."""
        self._reregister = False
        old = self.session
        self._lose_session()
        if old is not None:
            with contextlib.suppress(BrokerUnavailable, BrokerRejected, SessionLost):
                await self.broker.deregister(old.session_id)

    async def _pause(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)

    def _warn_clash(self, where: str) -> None:
        """Two live processes use one name: each registration replaces the other's session.

        While the clash lasts it recurs every few seconds: one warning a minute is enough.
        """
        self._clashes += 1
        now = time.monotonic()
        if self._clash_warned is not None and now - self._clash_warned < CLASH_WARN_EVERY:
            return
        self._clash_warned = now
        log.warning(
            "connector_name_clash",
            name=self.settings.name,
            seen_in=where,
            clashes=self._clashes,
            message="another connector with this token registered the same name; each "
            "registration replaces the other's session",
            hint=CLASH_HINT,
        )

    def _lose_session(self) -> None:
        self._cut_seen = False
        self._stop_mux()
        self.session = None
        self.status.session_id = None
        self.status.reconnects += 1

    async def _broker_trouble(self, exc: Exception) -> None:
        self.status.broker_error = str(exc)
        delay = self._backoff.next_delay(cap=retry_cap(exc))
        if isinstance(exc, BrokerRejected):
            # A wrong token will not fix itself quickly: wait at least 5 s between tries.
            delay = max(delay, 5.0)
            log.error("broker_rejected", error=str(exc), retry_in_s=round(delay, 2))
        else:
            # Tries come about every second while the broker is down: warn for the first
            # few, then once every 30 s (the rest at debug level).
            now = time.monotonic()
            loud = self._backoff.attempt <= 3 or now - self._warned_at >= QUIET_WARN_EVERY
            if loud:
                self._warned_at = now
            (log.warning if loud else log.debug)(
                "broker_unreachable",
                error=str(exc),
                retry_in_s=round(delay, 2),
                tries=self._backoff.attempt,
            )
        await self._pause(delay)

    async def _register(self) -> None:
        s = self.settings
        models = await self._current_models()
        if not self.capacity.detected:
            await self._detect_capacity()
        verdict = self._path
        mode = s.upload_mode
        if mode is UploadMode.AUTO:
            mode = verdict.upload_mode if verdict is not None else await self._probe_mode()
        # The multiplexed upload where the path streams bodies (auto) or when asked (mux);
        # on the wire the mode stays stream, which every v1 broker accepts.
        wants_mux = mode is UploadMode.MUX or (
            s.upload_mode is UploadMode.AUTO and mode is UploadMode.STREAM
        )
        if mode is UploadMode.MUX:
            mode = UploadMode.STREAM
        reply = await self.broker.register(
            RegisterRequest(
                name=s.name,
                models=models,
                capacity=self.capacity.value,
                capacity_source=self.capacity.source,
                instance_id=self.instance_id,
                version=VERSION,
                upload_mode=mode,
                revision=PROTOCOL_REVISION,
                mux_upload=wants_mux,
            )
        )
        reused = verdict is not None and verdict.answered_mode is reply.upload_mode
        if verdict is not None and reused:
            self.stream_polls = verdict.stream_polls
        else:
            self.stream_polls = await self._choose_poll_mode(reply.upload_mode)
        self.status.poll_mode = "stream" if self.stream_polls else "classic"
        if s.upload_mode is UploadMode.AUTO or s.poll_mode == "auto":
            self._path = PathVerdict(mode, reply.upload_mode, self.stream_polls)
        self.session = reply
        self.status.session_id = reply.session_id
        self.status.upload_mode = reply.upload_mode.value
        if reply.mux_upload and reply.upload_mode is UploadMode.STREAM:
            self._start_mux(reply)
            self.status.upload_mode = UploadMode.MUX.value
        self.status.models = models
        self.status.broker_error = None
        self._backoff.reset()
        log.info(
            "registered",
            session=reply.session_id,
            name=s.name,
            models=models,
            capacity=self.capacity.value,
            capacity_source=self.capacity.source,
            upload_mode=self.status.upload_mode,
            poll_mode=self.status.poll_mode,
            probes_reused=reused,
            poll_wait_s=reply.poll_wait_s,
            replaced=reply.replaced.value,
        )
        if reply.replaced is Replaced.LIVE:
            self._warn_clash("registration")
        _log_refused(reply.refused)

    def _start_mux(self, session: RegisterResponse) -> None:
        sid = session.session_id

        def send(body: AsyncIterator[bytes]) -> Awaitable[UploadResult]:
            return self.broker.upload_mux(sid, body)

        self.mux = MuxUploader(send, session.heartbeat_s)
        self.mux.start()

    def _stop_mux(self) -> None:
        if self.mux is not None:
            self.mux.abort()
            self.mux = None

    def forget_path(self, reason: str) -> None:
        """A failure suggests the path to the broker changed: probe again next registration."""
        if self._path is not None:
            self._path = None
            log.info("path_verdict_forgotten", reason=reason)

    async def _detect_capacity(self) -> None:
        async def get_json(path: str) -> object:
            return await self.upstream.get_json(path, timeout=CAPACITY_PROBE_TIMEOUT)

        found = await capacity.detect(get_json)
        if found == self.capacity:
            return
        changed = found.value != self.capacity.value
        self.capacity = found
        self._show_capacity()
        log.info("capacity", capacity=found.value, source=found.source)
        if changed and found.detected and self.session is not None:
            # The broker knows only what we registered with: register again.
            self._reregister = True
            if self._poll_task is not None:
                self._poll_task.cancel()

    def _show_capacity(self) -> None:
        self.status.capacity = self.capacity.value
        self.status.capacity_source = self.capacity.source

    async def _choose_poll_mode(self, upload_mode: UploadMode) -> bool:
        """Stream polls only where the path delivers responses as they are sent."""
        wanted = self.settings.poll_mode
        stream = wanted == "stream"
        if wanted == "auto":
            if upload_mode is UploadMode.STREAM:
                spread = await self.broker.probe_download()
                stream = spread >= 300.0
                log.info("poll_probe", spread_ms=round(spread, 1), stream_polls=stream)
            # A path that buffers uploads (parts mode) is assumed to buffer answers too.
        return stream

    async def _probe_mode(self) -> UploadMode:
        result = await self.broker.probe()
        mode = UploadMode.STREAM if result.incremental else UploadMode.PARTS
        log.info(
            "upload_probe",
            incremental=result.incremental,
            spread_ms=round(result.spread_ms, 1),
            upload_mode=mode.value,
        )
        return mode

    async def _current_models(self) -> list[str]:
        if self.settings.models:
            return servable(list(self.settings.models))
        try:
            models = await self.upstream.models()
        except UpstreamError as exc:
            self._llm_state(False, str(exc))
            log.warning("model_discovery_failed", error=str(exc))
            return list(self.status.models)
        self._llm_state(True, None)
        return servable(models)

    def _llm_state(self, ok: bool, error: str | None) -> None:
        self.status.llm_ok = ok
        self.status.llm_error = error
        self.status.llm_checked = time.monotonic()

    async def _refresh_models(self) -> None:
        """Keep the served models current with what the local LLM lists."""
        while True:
            # While the LLM has listed nothing yet (not started, still loading), look again
            # every few seconds so the connector serves as soon as it is up.
            wait = self.settings.model_refresh
            if not self.status.models or not self.capacity.detected:
                wait = min(wait, EMPTY_MODELS_REFRESH)
            await asyncio.sleep(wait)
            if self._draining:
                continue
            if not self.capacity.detected:
                await self._detect_capacity()
            if self.settings.models or self.session is None:
                continue
            models = await self._current_models()
            if sorted(models) != sorted(self.status.models) and self.session is not None:
                try:
                    refused = await self.broker.update_models(self.session.session_id, models)
                    self.status.models = models
                    _log_refused(refused)
                    log.info("models_changed", models=models)
                except SessionReplaced:
                    self._warn_clash("models_update")
                except (BrokerUnavailable, BrokerRejected, SessionLost) as exc:
                    log.warning("models_update_failed", error=str(exc))

    async def _poll_once(self) -> None:
        session = self.session
        assert session is not None
        if self.stream_polls:

            def dispatch(items: list[WorkItem]) -> None:
                self.status.last_poll_ok = time.monotonic()
                self._dispatch(items, session)

            cuts = self.broker.poll_cuts
            self._poll_task = asyncio.create_task(
                self.broker.poll_stream(session.session_id, session.poll_wait_s, dispatch)
            )
            try:
                await self._poll_task
            except BrokerUnavailable as exc:
                if by_proxy(exc):
                    self.forget_path(f"a proxy answered a streaming poll: {exc}")
                self._cut_seen = False
                raise
            finally:
                self._poll_task = None
            if self._cut_seen:
                # Cut, and the broker is still there: something on the path ends streamed
                # answers. (A cut followed by a refused connection was the broker going.)
                self.forget_path("streaming polls are cut short")
            self._cut_seen = self.broker.poll_cuts != cuts
            self.status.last_poll_ok = time.monotonic()
            self.status.broker_error = None
            return
        self._poll_task = asyncio.create_task(
            self.broker.poll(session.session_id, session.poll_wait_s)
        )
        try:
            items = await self._poll_task
        finally:
            self._poll_task = None
        self.status.last_poll_ok = time.monotonic()
        self.status.broker_error = None
        assert isinstance(items, list)
        self._dispatch(items, session)

    def _dispatch(self, items: list[WorkItem], session: RegisterResponse) -> None:
        for item in items:
            if isinstance(item, CancelItem):
                self._cancel(item.request_id)
            elif isinstance(item, RequestItem):
                self._start(item, session)

    async def _poll_while_draining(self) -> None:
        while self.session is not None:
            try:
                await self._poll_once()
            except (BrokerUnavailable, BrokerRejected, SessionLost):
                await asyncio.sleep(1.0)

    # -- requests -------------------------------------------------------------------------

    def _cancel(self, request_id: str) -> None:
        task = self.tasks.get(request_id)
        if task is not None:
            log.info("request_cancelled", request_id=request_id)
            task.cancel()

    def _start(self, item: RequestItem, session: RegisterResponse) -> None:
        old = self.tasks.get(item.request_id)
        if old is not None:
            old.cancel()
        task = asyncio.create_task(self._serve(item, session), name=f"req-{item.request_id}")
        self.tasks[item.request_id] = task
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        request_id = task.get_name().removeprefix("req-")
        if self.tasks.get(request_id) is task:
            del self.tasks[request_id]

    async def _serve(self, item: RequestItem, session: RegisterResponse) -> None:
        structlog.contextvars.bind_contextvars(request_id=item.request_id, model=item.model)
        mux = self.mux
        if mux is not None and session is self.session:
            if mux.usable:
                await self._serve_mux(item, mux)
                return
            self.status.upload_mode = UploadMode.STREAM.value  # it gave up: per request
        pipe = FramePipe(session.heartbeat_s)
        reader = asyncio.create_task(self.upstream.pump(item, pipe))
        try:
            if session.upload_mode is UploadMode.PARTS:
                await self._upload_parts(item, session, pipe)
            else:
                result = await self.broker.upload_stream(
                    session.session_id, item.request_id, pipe.frames()
                )
                if result.status == "cancelled":
                    log.info("request_cancelled_by_broker")
            self.status.served += 1
        except LeaseLost:
            log.info("lease_lost")
        except SessionReplaced:
            self.status.failed += 1
            self._warn_clash("upload")
        except (BrokerUnavailable, BrokerRejected, SessionLost) as exc:
            self.status.failed += 1
            log.warning("upload_failed", error=str(exc))
            if isinstance(exc, BrokerUnavailable) and by_proxy(exc):
                self.forget_path(f"a proxy answered an upload: {exc}")
        except asyncio.CancelledError:
            pass
        except Exception:  # a bug must not leave the request hanging or kill the connector
            self.status.failed += 1
            log.exception("request_failed")
        finally:
            # Closing the upstream request makes llama.cpp, vLLM and Ollama stop generating.
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _serve_mux(self, item: RequestItem, mux: MuxUploader) -> None:
        """The multiplexed upload: the pump writes straight into the request's stream.

        A cancel item (the user left, or the lease went elsewhere) or the loss of the upload
        carrying it cancels this task, which closes the upstream request.
        """
        task = asyncio.current_task()
        assert task is not None
        stream = mux.open(item.request_id, task.cancel)
        try:
            await self.upstream.pump(item, stream)
            self.status.served += 1
        except asyncio.CancelledError:
            log.info("request_stopped")
        finally:
            stream.close()

    async def _upload_parts(
        self, item: RequestItem, session: RegisterResponse, pipe: FramePipe
    ) -> None:
        """Parts mode: small sequenced POSTs; the first at once, then every ~100 ms or 64 KiB."""
        send = self.broker.upload_part
        sid, rid = session.session_id, item.request_id
        limit = session.max_part_bytes
        loop = asyncio.get_running_loop()
        # Part 0 acknowledges the lease at once, even before the LLM answers.
        result = await send(sid, rid, 0, framing.HEARTBEAT_FRAME)
        seq = 1
        last_sent = loop.time()
        data_sent = False
        while result.status != "cancelled":
            chunk = await pipe.get(session.heartbeat_s)
            blob = bytearray(chunk or framing.HEARTBEAT_FRAME)
            if data_sent and not pipe.ended:
                wait = PART_INTERVAL - (loop.time() - last_sent)
                if wait > 0 and len(blob) < limit:
                    await asyncio.sleep(wait)
                    blob += pipe.drain()
            # Never more than max_part_bytes per POST (frames may span parts): proxies cap
            # request bodies (nginx: 1 MiB), and a burst from the LLM can be far larger.
            data = bytes(blob)
            for start in range(0, len(data), limit):
                piece = data if len(data) <= limit else data[start : start + limit]
                result = await send(sid, rid, seq, piece)
                seq += 1
                if result.status == "cancelled":
                    return
            last_sent = loop.time()
            data_sent = data_sent or pipe.has_data
            if pipe.ended and not pipe.buffered:
                return

    async def _drain(self) -> None:
        """Graceful stop: no new work, finish what runs (bounded), deregister.

        The session stays and keeps polling with no models routed to it, so cancels for the
        requests still running reach us while they finish.
        """
        self._draining = True
        session = self.session
        if session is not None and self.tasks:
            log.info("draining", in_flight=len(self.tasks))
            poller: asyncio.Task[None] | None = None
            with contextlib.suppress(BrokerUnavailable, BrokerRejected, SessionLost):
                await self.broker.update_models(session.session_id, [])
                poller = asyncio.create_task(self._poll_while_draining())
            deadline = time.monotonic() + self.settings.drain_timeout
            while self.tasks and (remaining := deadline - time.monotonic()) > 0:
                await asyncio.wait(
                    list(self.tasks.values()),
                    timeout=remaining,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            if self.tasks:
                log.warning("drain_timeout", cancelled=len(self.tasks))
                for task in list(self.tasks.values()):
                    task.cancel()
                await asyncio.wait(list(self.tasks.values()), timeout=5.0)
        if self.mux is not None:
            await self.mux.close()
            self.mux = None
        if session is not None:
            with contextlib.suppress(BrokerUnavailable, BrokerRejected, SessionLost):
                await self.broker.deregister(session.session_id)


def retry_cap(exc: Exception) -> float | None:
    """The longest wait before the next try: short while nothing answers at all."""
    if isinstance(exc, BrokerUnavailable) and exc.status is None:
        return UNREACHABLE_RETRY
    if isinstance(exc, BrokerUnavailable) and not exc.from_broker and exc.status in (502, 503, 504):
        # A reverse proxy in front of the broker answers for it while it is down.
        return UNREACHABLE_RETRY
    return None


def by_proxy(exc: BrokerUnavailable) -> bool:
    """Something on the path, not the broker, answered with an error."""
    return exc.status is not None and not exc.from_broker


def servable(models: list[str]) -> list[str]:
    """The models whose names the broker accepts (shared/model_names.py); the others are
    left out with a warning, so one odd name does not keep the rest from being served."""
    kept, problems = split_valid(models)
    for problem in problems:
        log.warning("model_name_refused", error=problem, hint="rename the model in the LLM")
    return kept


def _log_refused(refused: list[RefusedModel]) -> None:
    for item in refused:
        log.warning("model_refused_by_broker", model=item.model, reason=item.reason)
