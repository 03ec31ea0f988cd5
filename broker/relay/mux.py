"""The multiplexed upload: one long-lived POST per connector carries every response's frames.

A connector that was granted it (protocol revision 2, ``mux_upload`` at registration)
opens ``POST /relay/v1/sessions/{sid}/mux`` before any work arrives and keeps it open.
Each run of one response's frames travels in a ``MUX`` frame tagged with its request ID
(``shared.framing``); here a ``MuxLane`` decodes one such upload and hands each run to the
request's own ``FrameApplier``, so every per-request rule keeps its meaning:

- the first frame of a request acknowledges its lease (``hub.ack``), as a per-request
  upload's start does;
- frames for a request the session does not hold (re-leased, cancelled, over, another
  session's, made up) are dropped at O(1) cost and never affect any other session's
  request; the connector gets a ``cancel`` item in its next poll (the 409 of a
  per-request upload, told the way cancels already travel; the cancels a session can hold
  are bounded), and the upload logs one line for them, not one per frame;
- a request's own bad frames or oversized answer fail that request, not the upload;
- buffering is bounded per request: the lane never waits for an API client (that would
  stall every other response on the upload); a response whose unsent bytes pass
  ``buffer_limit`` (its client stopped reading) fails with ``client_too_slow`` and the
  connector is told to stop, so its GPU does not keep generating for nobody.

A lane that ends with ``CLOSE`` ended cleanly: its unfinished requests are handed over
to the connector's next lane, which a load balancer may send to another broker (the
connector rotates only at frame boundaries). Where the relay state lets go of them (Redis:
they stop counting here, so a drain completes) the registry forgets them too, and the next
lane's first frame for each acknowledges it again; otherwise they wait in the registry.
A lane cut without ``CLOSE`` (a proxy or the network dropped it) fails the requests whose
frames it carried with 502, as a cut per-request upload does; the core never redispatches
a request once a byte reached its user.
"""

from __future__ import annotations

from collections import OrderedDict

from broker.core import LeaseError
from broker.relay.upload import FrameApplier, UploadTooLarge
from broker.state.relay import RelayState
from shared.errors import FrameError
from shared.framing import FrameDecoder, FrameType, split_mux
from shared.hoptrace import HopTrace
from shared.logging import get_logger

log = get_logger("broker.relay.mux")

DROPPED_REMEMBERED = 4096


class MuxRegistry:
    """Every request that is being uploaded on a multiplexed upload, by request ID."""

    def __init__(
        self,
        hub: RelayState,
        response_limit: int,
        buffer_limit: int,
        trace: HopTrace | None = None,
    ) -> None:
        self.hub = hub
        self.trace = trace
        self.response_limit = response_limit
        self.buffer_limit = buffer_limit
        self.appliers: dict[str, FrameApplier] = {}
        self.owners: dict[str, MuxLane | None] = {}  # None: its lane closed cleanly
        # Requests whose further frames are dropped unseen (over, refused, failed).
        # Keyed by (session, request): another session's frames never silence a request.
        self.dropped: OrderedDict[tuple[str, str], None] = OrderedDict()

    def lane(self, session_id: str) -> MuxLane:
        self.prune()
        return MuxLane(self, session_id)

    def prune(self) -> None:
        """Forget requests that ended elsewhere (timed out, their session died)."""
        ended = self.hub.is_cancelled
        for rid in [r for r in self.appliers if ended(r)]:
            self.drop(rid)

    def drop(self, rid: str) -> None:
        """Drop the request's further frames (from the session that held it) unseen."""
        applier = self.appliers.pop(rid, None)
        self.owners.pop(rid, None)
        if applier is None:
            return
        self.dropped[(applier.pending.session_id or "", rid)] = None
        while len(self.dropped) > DROPPED_REMEMBERED:
            self.dropped.popitem(last=False)

    def hand_over(self, rid: str) -> None:
        """Its lane closed cleanly: the connector's next lane continues it, here or on
        another broker. Where the relay state lets go of it, so does the registry (not as
        dropped: if the next lane comes here, its first frame acknowledges it again).

        A connector older than frame-boundary rotation may have cut a frame: the rest of it
        can be decoded only here, so such a request stays held here as before.
        """
        applier = self.appliers.get(rid)
        if applier is not None and not applier.decoder.pending and self.hub.hand_over(rid):
            self.appliers.pop(rid, None)
            self.owners.pop(rid, None)
        else:
            self.owners[rid] = None

    async def forget(self, rid: str) -> None:
        """The request was uploaded here and is over: drop it and free its slot."""
        self.drop(rid)
        await self.hub.finish(rid)


class MuxLane:
    """One multiplexed upload: decodes it and routes each request's frames."""

    __slots__ = ("closed", "decoder", "owned", "refused", "registry", "session_id")

    def __init__(self, registry: MuxRegistry, session_id: str) -> None:
        self.registry = registry
        self.session_id = session_id
        self.decoder = FrameDecoder()
        self.owned: set[str] = set()
        self.closed = False  # CLOSE arrived: the connector ended this upload cleanly
        self.refused = 0  # frames dropped: their request was not this session's

    async def feed(self, data: bytes) -> None:
        """Apply every frame completed by ``data``. Raises FrameError for a broken upload."""
        for frame in self.decoder.feed(data):
            kind = frame.type
            if kind is FrameType.MUX:
                rid, inner = split_mux(frame.payload)
                await self._apply(rid, inner)
            elif kind is FrameType.CLOSE:
                self.closed = True
                return
            elif kind is not FrameType.HEARTBEAT:  # HEARTBEAT keeps the upload alive
                raise FrameError(f"a {kind.name} frame outside a MUX frame")

    async def _apply(self, rid: str, inner: bytes) -> None:
        registry = self.registry
        applier = registry.appliers.get(rid)
        if applier is None:
            if (self.session_id, rid) in registry.dropped:
                return
            applier = await self._open(rid)
            if applier is None:
                return
        elif applier.pending.session_id != self.session_id:
            # Another session's request: its frames are dropped here, it is never touched.
            await self._refuse(rid)
            return
        elif registry.owners.get(rid) is not self:
            if registry.owners.get(rid) is not None:
                # Frames of one response on two open uploads cannot be put in order.
                message = "a response's frames came on two uploads"
                await self._fail(rid, applier, 502, "bad_upload", message)
                return
            registry.owners[rid] = self  # it continues here after its lane closed cleanly
            self.owned.add(rid)
        if applier.cancelled:
            # Its API user left (the connector already has a cancel) or it failed here.
            if not applier.pending.cancelled:
                await registry.hub.refuse(self.session_id, rid)
            await self._forget(rid)
            return
        try:
            applier.feed(inner)
            if registry.trace is not None:
                _traced(registry.trace, rid, applier)
        except (FrameError, UploadTooLarge) as exc:
            log.warning("upload_rejected", request_id=rid, error=str(exc))
            message = f"the connector sent a bad response: {exc}"
            await self._fail(rid, applier, 502, "bad_upload", message)
            return
        await applier.flush()
        if applier.done:
            await self._forget(rid)
        elif applier.channel.buffered > registry.buffer_limit:
            log.warning(
                "client_too_slow",
                request_id=rid,
                buffered=applier.channel.buffered,
                limit=registry.buffer_limit,
            )
            await self._fail(
                rid,
                applier,
                502,
                "client_too_slow",
                f"the API client read too slowly: over {registry.buffer_limit} bytes of "
                "the response waited for it",
            )

    async def _open(self, rid: str) -> FrameApplier | None:
        """A request's first frame: it acknowledges the lease."""
        registry = self.registry
        hub = registry.hub
        try:
            pending, channel = await hub.ack(self.session_id, rid)
        except LeaseError:
            # It may be another session's now: never finish it, nor drop its frames, here.
            await self._refuse(rid)
            return None
        applier = FrameApplier(hub, hub.clock, pending, channel, registry.response_limit)
        if registry.trace is not None:
            registry.trace.mark(rid, "demux_ack")
        registry.appliers[rid] = applier
        registry.owners[rid] = self
        self.owned.add(rid)
        return applier

    async def _refuse(self, rid: str) -> None:
        """Frames for a request this session does not hold: dropped, at O(1) cost.

        The connector is told to stop it (once: the relay state keeps the cancels in a
        bounded set); one log line per upload, the rest are counted and logged at its end.
        """
        self.refused += 1
        if self.refused == 1:
            log.info("mux_frames_refused", request_id=rid, reason="not held by this session")
        await self.registry.hub.refuse(self.session_id, rid)

    async def _fail(
        self, rid: str, applier: FrameApplier, status: int, code: str, message: str
    ) -> None:
        """End one request with an error and tell the connector to stop sending it."""
        await applier.abort(status, code, message)
        await self.registry.hub.refuse(self.session_id, rid)
        await self._forget(rid)

    async def _forget(self, rid: str) -> None:
        self.owned.discard(rid)
        await self.registry.forget(rid)

    async def end(self, clean: bool) -> None:
        """The upload is over: after CLOSE its requests wait for the next lane, else they fail."""
        registry = self.registry
        if self.refused > 1:
            log.info("mux_frames_refused_total", session=self.session_id, frames=self.refused)
        for rid in self.owned:
            applier = registry.appliers.get(rid)
            if applier is None:
                continue
            if clean:
                registry.hand_over(rid)
            else:
                await applier.abort(502, "connector_lost", "the connector's upload ended early")
                await registry.forget(rid)
        self.owned.clear()


def _traced(trace: HopTrace, rid: str, applier: FrameApplier) -> None:
    """The hops of a request's frames decoded here (``--trace-hops``)."""
    if applier.pending.head_seen:
        trace.mark(rid, "demux_head")
    if applier.received:
        trace.mark(rid, "demux_data")
