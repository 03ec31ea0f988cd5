"""The models the connector serves: as configured, or as the local LLM lists them.

``ModelWatch.current`` asks the LLM (and records whether it answered), ``update`` tells
the broker when the list changed, ``check_llm`` answers the health server's question
whether the LLM is up. Names the broker would refuse are left out here, with a warning.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from connector.broker_client import BrokerClient
from connector.errors import BrokerRejected, BrokerUnavailable, SessionLost, SessionReplaced
from connector.settings import ConnectorSettings
from connector.status import Emit, LlmChecked, ModelsChanged, Status
from connector.trouble import ClashWarner
from connector.upstream import Upstream, UpstreamError
from shared.logging import get_logger
from shared.model_names import split_valid
from shared.protocol import RefusedModel, RegisterResponse

log = get_logger("connector.models")

EMPTY_MODELS_REFRESH = 5.0  # seconds between discoveries while no model is known
LLM_CHECK_TIMEOUT = 3.0  # seconds for the health server's question to the LLM


def servable(models: list[str]) -> list[str]:
    """The models whose names the broker accepts (shared/model_names.py); the others are
    left out with a warning, so one odd name does not keep the rest from being served."""
    kept, problems = split_valid(models)
    for problem in problems:
        log.warning("model_name_refused", error=problem, hint="rename the model in the LLM")
    return kept


def log_refused(refused: list[RefusedModel]) -> None:
    for item in refused:
        log.warning("model_refused_by_broker", model=item.model, reason=item.reason)


class ModelWatch:
    def __init__(
        self,
        settings: ConnectorSettings,
        upstream: Upstream,
        broker: BrokerClient,
        status: Callable[[], Status],
        emit: Emit,
        clashes: ClashWarner,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._upstream = upstream
        self._broker = broker
        self._status = status
        self._emit = emit
        self._clashes = clashes
        self._clock = clock

    def refresh_wait(self, capacity_known: bool) -> float:
        """Seconds until the next look. While the LLM has listed nothing yet (not started,
        still loading), look every few seconds so the connector serves as soon as it is up."""
        wait = self._settings.model_refresh
        if not self._status().models or not capacity_known:
            wait = min(wait, EMPTY_MODELS_REFRESH)
        return wait

    async def current(self) -> list[str]:
        """The models to serve now (the last known ones if the LLM does not answer)."""
        if self._settings.models:
            return servable(list(self._settings.models))
        try:
            models = await self._upstream.models()
        except UpstreamError as exc:
            self._emit(LlmChecked(False, str(exc), self._clock()))
            log.warning("model_discovery_failed", error=str(exc))
            return list(self._status().models)
        self._emit(LlmChecked(True, None, self._clock()))
        return servable(models)

    async def update(self, session: Callable[[], RegisterResponse | None]) -> None:
        """Look at what the LLM lists; tell the broker if it changed."""
        if self._settings.models or session() is None:
            return
        models = await self.current()
        now = session()  # the session may have ended while the LLM was asked
        if sorted(models) == sorted(self._status().models) or now is None:
            return
        try:
            refused = await self._broker.update_models(now.session_id, models)
        except SessionReplaced:
            self._clashes.warn("models_update")
            return
        except (BrokerUnavailable, BrokerRejected, SessionLost) as exc:
            log.warning("models_update_failed", error=str(exc))
            return
        self._emit(ModelsChanged(tuple(models)))
        log_refused(refused)
        log.info("models_changed", models=models)

    async def check_llm(self, max_age: float) -> None:
        """Ask the LLM whether it is up, unless it was asked within ``max_age`` seconds."""
        if self._clock() - self._status().llm_checked < max_age:
            return
        try:
            await self._upstream.models(timeout=LLM_CHECK_TIMEOUT)
        except UpstreamError as exc:
            self._emit(LlmChecked(False, str(exc), self._clock()))
        else:
            self._emit(LlmChecked(True, None, self._clock()))
