"""The connector's session with the broker: registration, its multiplexed upload, its end.

``SessionKeeper`` owns the session: ``register`` (with the modes the path allows, from
``PathProbe``), ``lose`` (the broker forgot it, or it was replaced), ``renew`` (register
again after the capacity changed) and ``close`` (the end of a drain). Others read
``session``, ``mux`` and ``stream_polls``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable

from connector.broker_client import BrokerClient
from connector.capacity import Capacity
from connector.errors import BrokerRejected, BrokerUnavailable, SessionLost
from connector.models import log_refused
from connector.mux import ACK_GRACE, MuxUploader
from connector.probing import PathProbe
from connector.settings import ConnectorSettings
from connector.status import Emit, Registered, SessionEnded
from connector.trouble import ClashWarner
from shared.hoptrace import HopTrace
from shared.logging import get_logger
from shared.protocol import (
    PROTOCOL_REVISION,
    RegisterRequest,
    RegisterResponse,
    Replaced,
    UploadMode,
    UploadResult,
)

log = get_logger("connector.session")

VERSION = "0.1.0"


class SessionKeeper:
    def __init__(
        self,
        settings: ConnectorSettings,
        broker: BrokerClient,
        probe: PathProbe,
        clashes: ClashWarner,
        emit: Emit,
        trace: HopTrace | None = None,
    ) -> None:
        self._settings = settings
        self._trace = trace
        self._broker = broker
        self._probe = probe
        self._clashes = clashes
        self._emit = emit
        # Random per process: the broker tells our restart from a second live process.
        self.instance_id = uuid.uuid4().hex
        self.session: RegisterResponse | None = None
        self.mux: MuxUploader | None = None  # the session's multiplexed upload, if granted
        self.stream_polls = False
        self.renewal_wanted = False  # the capacity changed: register again

    async def register(self, models: list[str], capacity: Capacity, engine: str = "") -> None:
        verdict = self._probe.kept()
        mode = await self._probe.upload_mode(verdict)
        # The multiplexed upload where the path streams bodies (auto) or when asked (mux);
        # on the wire the mode stays stream, which every v1 broker accepts.
        wants_mux = mode is UploadMode.MUX or (
            self._settings.upload_mode is UploadMode.AUTO and mode is UploadMode.STREAM
        )
        if mode is UploadMode.MUX:
            mode = UploadMode.STREAM
        request = self._request(models, capacity, mode, wants_mux, engine)
        reply = await self._broker.register(request)
        choice = await self._probe.poll_mode(verdict, mode, reply.upload_mode)
        self.stream_polls = choice.stream_polls
        self.session = reply
        serving_mode = reply.upload_mode
        if reply.mux_upload and reply.upload_mode is UploadMode.STREAM:
            self._start_mux(reply)
            serving_mode = UploadMode.MUX
        poll_mode = "stream" if choice.stream_polls else "classic"
        self._emit(Registered(reply.session_id, serving_mode.value, poll_mode, tuple(models)))
        log.info(
            "registered",
            session=reply.session_id,
            name=self._settings.name,
            models=models,
            capacity=capacity.value,
            capacity_source=capacity.source,
            engine=engine or None,
            upload_mode=serving_mode.value,
            poll_mode=poll_mode,
            probes_reused=choice.reused,
            poll_wait_s=reply.poll_wait_s,
            replaced=reply.replaced.value,
        )
        if reply.replaced is Replaced.LIVE:
            self._clashes.warn("registration")
        log_refused(reply.refused)

    def _request(
        self,
        models: list[str],
        capacity: Capacity,
        mode: UploadMode,
        wants_mux: bool,
        engine: str,
    ) -> RegisterRequest:
        return RegisterRequest(
            name=self._settings.name,
            models=models,
            capacity=capacity.value,
            capacity_source=capacity.source,
            instance_id=self.instance_id,
            version=VERSION,
            upload_mode=mode,
            revision=PROTOCOL_REVISION,
            mux_upload=wants_mux,
            engine=engine,
        )

    def _start_mux(self, session: RegisterResponse) -> None:
        sid = session.session_id

        def send(body: AsyncIterator[bytes]) -> Awaitable[UploadResult]:
            return self._broker.upload_mux(sid, body)

        # The ACK may wait for the upstream's head, well within the lease (connector.mux).
        ack_after = min(ACK_GRACE, session.lease_s / 10)
        self.mux = MuxUploader(send, session.heartbeat_s, trace=self._trace, ack_after=ack_after)
        self.mux.start()

    def lose(self) -> None:
        """The session is gone (or given up): the next round registers again."""
        if self.mux is not None:
            self.mux.abort()
            self.mux = None
        self.session = None
        self._emit(SessionEnded())

    async def renew(self) -> None:
        """Register again (the capacity changed): end our old session first, so the broker
        sees a goodbye rather than two registrations of one name."""
        self.renewal_wanted = False
        old = self.session
        self.lose()
        if old is not None:
            await self._goodbye(old)

    async def close(self) -> None:
        """The end of a drain: finish the multiplexed upload, then end the session."""
        if self.mux is not None:
            await self.mux.close()
            self.mux = None
        if self.session is not None:
            await self._goodbye(self.session)

    async def _goodbye(self, session: RegisterResponse) -> None:
        with contextlib.suppress(BrokerUnavailable, BrokerRejected, SessionLost):
            await self._broker.deregister(session.session_id)
