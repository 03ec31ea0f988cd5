"""What the connector does when the broker fails it: how long to wait, and what to warn.

``Retries.after(exc)`` logs a failure and says how long to wait before the next try
(``Backoff``, capped while nothing answers at all); ``ClashWarner`` warns, at most once a
minute, that another live process registers the same name. Neither sleeps: the caller
waits, so a stop request ends the wait.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from connector.backoff import Backoff
from connector.errors import BrokerRejected, BrokerUnavailable
from connector.status import BrokerFailed, Emit
from shared.logging import get_logger

log = get_logger("connector.trouble")

# While nothing answers (the broker is down or restarting), retry at least this often: a
# refused connection is cheap, and the connector serves again soon after the broker is up.
UNREACHABLE_RETRY = 1.0
# After another process took over our name, wait this long (jittered) before taking it
# back, so two clashing connectors do not replace each other in a tight loop.
CLASH_RETRY = (2.0, 4.0)
CLASH_HINT = "pass --name to give each connector its own name"
CLASH_WARN_EVERY = 60.0  # seconds between connector_name_clash warnings while it lasts
QUIET_WARN_EVERY = 30.0  # seconds between broker_unreachable warnings after the first few
REJECTED_WAIT = 5.0  # a wrong token will not fix itself quickly

Clock = Callable[[], float]


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


def clash_pause() -> float:
    """How long to wait before taking our name back from another process."""
    return random.uniform(*CLASH_RETRY)


class Retries:
    """The backoff between tries at the broker, and its warnings."""

    def __init__(self, emit: Emit, clock: Clock = time.monotonic) -> None:
        self._emit = emit
        self._clock = clock
        self._backoff = Backoff()
        self._warned_at = 0.0  # when broker_unreachable was last logged as a warning

    def reset(self) -> None:
        self._backoff.reset()

    def after(self, exc: BrokerUnavailable | BrokerRejected) -> float:
        """Log the failure; the seconds to wait before the next try."""
        self._emit(BrokerFailed(str(exc)))
        delay = self._backoff.next_delay(cap=retry_cap(exc))
        if isinstance(exc, BrokerRejected):
            delay = max(delay, REJECTED_WAIT)
            log.error("broker_rejected", error=str(exc), retry_in_s=round(delay, 2))
            return delay
        # Tries come about every second while the broker is down: warn for the first few,
        # then once every 30 s (the rest at debug level).
        now = self._clock()
        tries = self._backoff.attempt
        loud = tries <= 3 or now - self._warned_at >= QUIET_WARN_EVERY
        if loud:
            self._warned_at = now
        (log.warning if loud else log.debug)(
            "broker_unreachable", error=str(exc), retry_in_s=round(delay, 2), tries=tries
        )
        return delay


class ClashWarner:
    """Two live processes use one name: each registration replaces the other's session.

    While the clash lasts it recurs every few seconds: one warning a minute is enough.
    """

    def __init__(self, name: str, clock: Clock = time.monotonic) -> None:
        self._name = name
        self._clock = clock
        self._warned: float | None = None  # when connector_name_clash was last logged
        self._clashes = 0

    def warn(self, where: str) -> None:
        self._clashes += 1
        now = self._clock()
        if self._warned is not None and now - self._warned < CLASH_WARN_EVERY:
            return
        self._warned = now
        log.warning(
            "connector_name_clash",
            name=self._name,
            seen_in=where,
            clashes=self._clashes,
            message="another connector with this token registered the same name; each "
            "registration replaces the other's session",
            hint=CLASH_HINT,
        )
