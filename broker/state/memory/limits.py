"""``LimitState`` in this process: the pure ``LimitBook`` behind the async interface."""

from __future__ import annotations

from collections.abc import Sequence

from broker.core.limits import LimitBook, Limits, Refusal, Reservation, SubjectUsage


class MemoryLimitState:
    """One broker process's limits (the default)."""

    def __init__(self) -> None:
        self.book = LimitBook()

    async def reserve(
        self, subjects: tuple[str, ...], demand: int, limits: Sequence[Limits], now: float
    ) -> Reservation | Refusal:
        return self.book.reserve(subjects, demand, limits, now)

    async def settle(self, reservation: Reservation, actual: int, now: float) -> None:
        self.book.settle(reservation, actual, now)

    async def usage_snapshot(
        self, now: float, subjects: Sequence[str] | None = None
    ) -> list[SubjectUsage]:
        return self.book.snapshot(now, subjects)
