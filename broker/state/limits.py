"""Where the limit counters live: the narrow ``LimitState`` interface.

The in-memory state (``broker.state.memory.limits``) wraps the pure ``LimitBook``
(``broker.core.limits``). A shared
implementation (several brokers, e.g. Redis with one atomic script per call) implements
the same three calls on the same plain data (``Limits``, ``Reservation``, ``Refusal``,
``SubjectUsage``), so the API path and the admin page never know which one they talk to.
Each call is atomic on its own: ``reserve`` takes from all subjects or from none.
``settle`` is awaited in the API handler's ``finally``, also while its task is being
cancelled (the user hung up): an implementation must finish it in that state and must not
raise for a reservation it no longer knows (a repeat, or counters lost in a restart).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from broker.core.limits import Limits, Refusal, Reservation, SubjectUsage


class LimitState(Protocol):
    async def reserve(
        self, subjects: tuple[str, ...], demand: int, limits: Sequence[Limits], now: float
    ) -> Reservation | Refusal:
        """Reserve ``demand`` tokens and one request on every subject (one ``Limits`` each)."""
        ...

    async def settle(self, reservation: Reservation, actual: int, now: float) -> None:
        """Correct the reservation to ``actual`` tokens and free its slot; a repeat is a no-op."""
        ...

    async def usage_snapshot(
        self, now: float, subjects: Sequence[str] | None = None
    ) -> list[SubjectUsage]:
        """The current counters of the given subjects (all known ones when ``None``)."""
        ...
