"""What every route shares: settings, the relay state, the stores (built in broker.composition)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker.accounts.enrollment import EnrollmentStore
from broker.accounts.keys import KeyStore
from broker.accounts.users import UsersStore
from broker.core.aliases import NO_ALIASES, AliasBook
from broker.metrics import BrokerMetrics
from broker.settings import BrokerSettings
from broker.state.limits import LimitState
from broker.state.memory.limits import MemoryLimitState
from broker.state.relay import RelayState
from broker.usage.ledger import UsageRecorder
from broker.usage.models_file import ModelsFileWatch
from broker.usage.prices import PriceBook
from shared.hoptrace import HopTrace

if TYPE_CHECKING:
    from broker.admin.operations import Operations

if TYPE_CHECKING:  # redis-py: loaded only with --redis-url (broker.composition)
    from broker.accounts.revocations import RevocationBoard


@dataclass
class BrokerState:
    settings: BrokerSettings
    relay: RelayState  # MemoryRelayState, or RedisRelayState with --redis-url
    keys: KeyStore
    metrics: BrokerMetrics
    # The users file: its keys authenticate the API whether the portal is on or not.
    users: UsersStore
    usage: UsageRecorder | None = None
    enrollment: EnrollmentStore | None = None
    prices: PriceBook | None = None  # from --models-file
    aliases: AliasBook = NO_ALIASES  # from --models-file (docs/aliases.md)
    models_file: ModelsFileWatch | None = None  # re-read on change: prices and aliases
    # The limit counters (docs/limits.md): in memory here, shared when brokers scale out.
    limiter: LimitState = field(default_factory=MemoryLimitState)
    # Key revocations and user blocks shared by several brokers (--redis-url only).
    revocations: RevocationBoard | None = None
    started: float = 0.0
    # Session id -> "stream" or "classic": how it polled last (for the admin page).
    poll_modes: dict[str, str] = field(default_factory=dict)
    # Per-request hop timestamps (--trace-hops, shared/hoptrace.py); None: off, free.
    trace: HopTrace | None = None
    # Every audited change (broker.admin.operations): the pages, the admin API and the CLI.
    operations: Operations | None = None
