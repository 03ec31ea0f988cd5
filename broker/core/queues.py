"""One model's waiting requests: FIFO per user, round-robin between users.

When a model's connectors are all busy, one user's burst must not push everyone else to
the back: each user has a FIFO of their own, and the queue serves the users in turn. A
user with one request waits behind at most one request of every other waiting user.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict, deque
from collections.abc import Iterator

from broker.core.records import Pending

ANONYMOUS = ""


def _seq_of(pending: Pending) -> int:
    return pending.seq


class ModelQueue:
    __slots__ = ("_size", "_turns")

    def __init__(self) -> None:
        # User -> their requests in arrival order; the first user is served next.
        self._turns: OrderedDict[str, deque[Pending]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[Pending]:
        """In the order they would be served."""
        lanes = [list(lane) for lane in self._turns.values()]
        for depth in range(max((len(lane) for lane in lanes), default=0)):
            for lane in lanes:
                if depth < len(lane):
                    yield lane[depth]

    def append(self, pending: Pending) -> None:
        """A new request: last in its user's line; a new user waits for one round."""
        user = pending.user or ANONYMOUS
        lane = self._turns.get(user)
        if lane is None:
            lane = self._turns[user] = deque()
        lane.append(pending)
        self._size += 1

    def put_back(self, pending: Pending) -> None:
        """A request that was handed out and came back: where it was, and its user next."""
        user = pending.user or ANONYMOUS
        lane = self._turns.get(user)
        if lane is None:
            lane = self._turns[user] = deque()
        lane.insert(bisect.bisect_left(lane, pending.seq, key=_seq_of), pending)
        self._turns.move_to_end(user, last=False)
        self._size += 1

    def peek(self) -> Pending | None:
        for lane in self._turns.values():
            return lane[0]
        return None

    def pop(self) -> Pending:
        """The next request; its user's turn passes to the next user."""
        user, lane = next(iter(self._turns.items()))
        pending = lane.popleft()
        if lane:
            self._turns.move_to_end(user)
        else:
            del self._turns[user]
        self._size -= 1
        return pending

    def remove(self, pending: Pending) -> bool:
        user = pending.user or ANONYMOUS
        lane = self._turns.get(user)
        if lane is None or pending not in lane:
            return False
        lane.remove(pending)
        if not lane:
            del self._turns[user]
        self._size -= 1
        return True
