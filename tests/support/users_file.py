"""Editing the broker's users file as an operator would (the broker re-reads it)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import yaml


def key_expiry(path: Path, name: str) -> float | None:
    """The expiry of the first key called ``name`` in the file (None: never)."""
    doc = yaml.safe_load(path.read_text())
    for user in doc["users"]:
        for key in user["keys"]:
            if key["name"] == name:
                expires = key.get("expires")
                if expires is None:
                    return None
                stamp = (
                    expires if isinstance(expires, datetime) else datetime.fromisoformat(expires)
                )
                return stamp.timestamp()
    raise KeyError(name)


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
