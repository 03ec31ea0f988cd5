"""What the broker's blueprints share: settings, relay hub, key store."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.hub import RelayHub
from broker.keys import KeyStore
from broker.settings import BrokerSettings


@dataclass
class BrokerState:
    settings: BrokerSettings
    hub: RelayHub
    keys: KeyStore
    started: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1
