"""What the path to the broker does with streamed bodies, probed once and kept.

With ``--upload-mode auto`` the upload probe says whether the path streams request bodies
(``stream``) or buffers them (``parts``); with ``--poll-mode auto`` the download probe says
whether answers arrive as they are sent (streaming polls). The verdict is kept across
re-registrations while the broker grants the same mode, and forgotten when a failure
suggests the path changed (a proxy answered, streaming polls are cut short).
"""

from __future__ import annotations

from dataclasses import dataclass

from connector.broker_client import BrokerClient
from connector.settings import ConnectorSettings
from shared.logging import get_logger
from shared.protocol import UploadMode

log = get_logger("connector.probing")

STREAM_SPREAD_MS = 300.0  # a download probe whose pieces arrive this far apart streams


@dataclass(frozen=True)
class PathVerdict:
    """What the probes found about the path to the broker, kept across re-registrations."""

    upload_mode: UploadMode  # what the upload probe chose
    answered_mode: UploadMode  # what the broker then granted
    stream_polls: bool


@dataclass(frozen=True)
class PollChoice:
    stream_polls: bool
    reused: bool  # taken from the kept verdict, no probe


class PathProbe:
    def __init__(self, settings: ConnectorSettings, broker: BrokerClient) -> None:
        self._settings = settings
        self._broker = broker
        self._verdict: PathVerdict | None = None

    def kept(self) -> PathVerdict | None:
        return self._verdict

    def forget(self, reason: str) -> None:
        """A failure suggests the path to the broker changed: probe again next registration."""
        if self._verdict is not None:
            self._verdict = None
            log.info("path_verdict_forgotten", reason=reason)

    async def upload_mode(self, verdict: PathVerdict | None) -> UploadMode:
        """The mode to ask for: as configured, or (auto) what the path was found to do."""
        mode = self._settings.upload_mode
        if mode is not UploadMode.AUTO:
            return mode
        return verdict.upload_mode if verdict is not None else await self._probe_upload()

    async def poll_mode(
        self, verdict: PathVerdict | None, asked: UploadMode, granted: UploadMode
    ) -> PollChoice:
        """Streaming polls or not, once the broker granted ``granted``; keeps the verdict."""
        s = self._settings
        reused = verdict is not None and verdict.answered_mode is granted
        if verdict is not None and reused:
            stream = verdict.stream_polls
        else:
            stream = await self._choose_poll_mode(granted)
        if s.upload_mode is UploadMode.AUTO or s.poll_mode == "auto":
            self._verdict = PathVerdict(asked, granted, stream)
        return PollChoice(stream, reused)

    async def _choose_poll_mode(self, upload_mode: UploadMode) -> bool:
        """Stream polls only where the path delivers responses as they are sent."""
        wanted = self._settings.poll_mode
        stream = wanted == "stream"
        if wanted == "auto":
            if upload_mode is UploadMode.STREAM:
                spread = await self._broker.probe_download()
                stream = spread >= STREAM_SPREAD_MS
                log.info("poll_probe", spread_ms=round(spread, 1), stream_polls=stream)
            # A path that buffers uploads (parts mode) is assumed to buffer answers too.
        return stream

    async def _probe_upload(self) -> UploadMode:
        result = await self._broker.probe()
        mode = UploadMode.STREAM if result.incremental else UploadMode.PARTS
        log.info(
            "upload_probe",
            incremental=result.incremental,
            spread_ms=round(result.spread_ms, 1),
            upload_mode=mode.value,
        )
        return mode
