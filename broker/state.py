"""What the broker's blueprints share: settings, relay hub, key store."""

from __future__ import annotations

from dataclasses import dataclass

from broker.keys import KeyStore
from broker.metrics import BrokerMetrics
from broker.relay_state import RelayState
from broker.settings import BrokerSettings
from broker.usage import UsageRecorder


@dataclass
class BrokerState:
    settings: BrokerSettings
    hub: RelayState
    keys: KeyStore
    metrics: BrokerMetrics
    usage: UsageRecorder | None = None
    started: float = 0.0
