"""The relay core: all relay state and every change to it, with no I/O.

Nothing here imports asyncio, Quart, Hypercorn or ``time``: every call that depends on time
takes ``now``, and the adapters (``broker.state.memory.relay``, ``broker.api.relay``) sleep until
``next_deadline()``. See docs/architecture.md.
"""

from broker.core.errors import (
    DispatchError,
    Draining,
    DuplicateRequest,
    LeaseError,
    NoConnector,
    QueueFull,
    SessionReplaced,
    StateUnavailable,
    TooManySessions,
    UnknownModel,
    UnknownSession,
)
from broker.core.records import Failure, Pending, Registration, Seen, Session, State, Timings
from broker.core.relay import Listener, RelayCore

__all__ = [
    "DispatchError",
    "Draining",
    "DuplicateRequest",
    "Failure",
    "LeaseError",
    "Listener",
    "NoConnector",
    "Pending",
    "QueueFull",
    "Registration",
    "RelayCore",
    "Seen",
    "Session",
    "SessionReplaced",
    "State",
    "StateUnavailable",
    "Timings",
    "TooManySessions",
    "UnknownModel",
    "UnknownSession",
]
