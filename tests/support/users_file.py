"""Editing the broker's users file as an operator would (the broker re-reads it)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import yaml


def expire_in_file(path: Path, name: str, seconds: float) -> float:
    """Set every key ``name``'s expiry ``seconds`` from now; returns that time."""
    doc = yaml.safe_load(path.read_text())
    until = time.time() + seconds
    stamp = datetime.fromtimestamp(until, UTC).isoformat()
    for user in doc["users"]:
        for key in user["keys"]:
            if key["name"] == name:
                key["expires"] = stamp
    path.write_text(yaml.safe_dump(doc))
    return until
