"""The broker program's settings for every ``remotellm-broker`` command (one declaration)."""

from __future__ import annotations

from broker.settings import BrokerSettings
from shared.settings import ProgramSettings

BROKER = ProgramSettings(BrokerSettings, "remotellm-broker", "REMOTELLM_BROKER_CONFIG")
