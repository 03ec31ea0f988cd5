"""What the broker's blueprints share: settings, relay hub, key store."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.enrollment import EnrollmentStore
from broker.keys import KeyStore
from broker.limiter import LimitState, MemoryLimitState
from broker.metrics import BrokerMetrics
from broker.prices import PriceBook
from broker.relay_state import RelayState
from broker.revocations import RevocationBoard
from broker.settings import BrokerSettings
from broker.usage import UsageRecorder


@dataclass
class BrokerState:
    settings: BrokerSettings
    hub: RelayState
    keys: KeyStore
    metrics: BrokerMetrics
    usage: UsageRecorder | None = None
    enrollment: EnrollmentStore | None = None
    prices: PriceBook | None = None  # from --models-file
    # The limit counters (docs/limits.md): in memory here, shared when brokers scale out.
    limiter: LimitState = field(default_factory=MemoryLimitState)
    # Key revocations and user blocks shared by several brokers (--redis-url only).
    revocations: RevocationBoard | None = None
    started: float = 0.0
    # Session id -> "stream" or "classic": how it polled last (for the admin page).
    poll_modes: dict[str, str] = field(default_factory=dict)
