"""The requests being served: one task each, from the poll's item to the last upload.

Each request goes out the way its session allows: on the multiplexed upload (``mux.py``)
while it works, else one streamed POST per response, or sequenced parts (``parts.py``)
where the path buffers request bodies. A cancel item cancels the request's task, which
closes the upstream request (llama.cpp, vLLM and Ollama then stop generating).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from connector.broker_client import BrokerClient
from connector.errors import (
    BrokerRejected,
    BrokerUnavailable,
    LeaseLost,
    SessionLost,
    SessionReplaced,
)
from connector.mux import MuxUploader
from connector.parts import upload_parts
from connector.pipe import FramePipe
from connector.probing import PathProbe
from connector.session import SessionKeeper
from connector.status import Emit, MuxGaveUp, RequestFailed, RequestServed
from connector.trouble import ClashWarner, by_proxy
from connector.upstream import Upstream
from shared.hoptrace import HopTrace
from shared.logging import get_logger
from shared.protocol import CancelItem, RegisterResponse, RequestItem, UploadMode, WorkItem

log = get_logger("connector.serving")

CANCEL_GRACE = 5.0  # seconds for cancelled requests to close their upstream calls


class Serving:
    def __init__(
        self,
        broker: BrokerClient,
        upstream: Upstream,
        keeper: SessionKeeper,
        probe: PathProbe,
        clashes: ClashWarner,
        emit: Emit,
        trace: HopTrace | None = None,
    ) -> None:
        self._trace = trace
        self._broker = broker
        self._upstream = upstream
        self._keeper = keeper
        self._probe = probe
        self._clashes = clashes
        self._emit = emit
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def dispatch(self, items: list[WorkItem], session: RegisterResponse) -> None:
        """Start what the poll handed over, cancel what it called off."""
        for item in items:
            if isinstance(item, CancelItem):
                self._cancel(item.request_id)
            elif isinstance(item, RequestItem):
                if self._trace is not None:
                    self._trace.mark(item.request_id, "poll_read")
                self._start(item, session)

    async def finish(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) for the running requests to end."""
        deadline = time.monotonic() + timeout
        while self.tasks and (remaining := deadline - time.monotonic()) > 0:
            await asyncio.wait(
                list(self.tasks.values()), timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )

    async def cancel_all(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.wait(list(self.tasks.values()), timeout=CANCEL_GRACE)

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
        mux = self._keeper.mux
        if mux is not None and session is self._keeper.session:
            if mux.usable:
                await self._serve_mux(item, mux)
                return
            self._emit(MuxGaveUp())  # it gave up: per request from now on
        pipe = FramePipe(session.heartbeat_s)
        reader = asyncio.create_task(self._upstream.pump(item, pipe))
        try:
            await self._upload(item, session, pipe)
            self._emit(RequestServed())
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # a bug must not leave the request hanging or kill the connector
            self._failed(exc)
        finally:
            # Closing the upstream request makes llama.cpp, vLLM and Ollama stop generating.
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _upload(self, item: RequestItem, session: RegisterResponse, pipe: FramePipe) -> None:
        """One response in its own POSTs: sequenced parts, or one streamed body."""
        if session.upload_mode is UploadMode.PARTS:
            await upload_parts(self._broker.upload_part, item, session, pipe)
            return
        result = await self._broker.upload_stream(
            session.session_id, item.request_id, pipe.frames()
        )
        if result.status == "cancelled":
            log.info("request_cancelled_by_broker")

    def _failed(self, exc: Exception) -> None:
        """Record and log why an upload ended early (called inside the ``except``)."""
        if isinstance(exc, LeaseLost):
            log.info("lease_lost")
            return
        self._emit(RequestFailed())
        if isinstance(exc, SessionReplaced):
            self._clashes.warn("upload")
        elif isinstance(exc, BrokerUnavailable | BrokerRejected | SessionLost):
            log.warning("upload_failed", error=str(exc))
            if isinstance(exc, BrokerUnavailable) and by_proxy(exc):
                self._probe.forget(f"a proxy answered an upload: {exc}")
        else:
            log.exception("request_failed")

    async def _serve_mux(self, item: RequestItem, mux: MuxUploader) -> None:
        """The multiplexed upload: the pump writes straight into the request's stream.

        A cancel item (the user left, or the lease went elsewhere) or the loss of the upload
        carrying it cancels this task, which closes the upstream request.
        """
        task = asyncio.current_task()
        assert task is not None
        stream = mux.open(item.request_id, task.cancel)
        try:
            await self._upstream.pump(item, stream)
            self._emit(RequestServed())
        except asyncio.CancelledError:
            log.info("request_stopped")
        finally:
            stream.close()
