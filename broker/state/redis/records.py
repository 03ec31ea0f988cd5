"""Session records as the Redis hashes hold them (``P s:<sid>``)."""

from __future__ import annotations

import json

from broker.core import Session
from broker.core.aliases import public_models
from broker.state.relay import SessionView
from shared.protocol import UploadMode


def session_record(sid: str, f: dict[str, str]) -> Session:
    return Session(
        id=sid,
        owner=f["owner"],
        name=f["name"],
        instance_id=f.get("instance", ""),
        models=frozenset(json.loads(f["models"])),
        capacity=int(f["capacity"]),
        capacity_source=f.get("csrc", ""),
        version=f.get("version", ""),
        upload_mode=UploadMode(f.get("mode", UploadMode.STREAM.value)),
        upstream_api_key=None,
        created=float(f.get("created", 0)),
        last_seen=float(f.get("last_seen", 0)),
        polling=int(f.get("polling", 0)),
        served=int(f.get("served", 0)),
        engine=f.get("eng", ""),
    )


def session_view(sid: str, f: dict[str, str], active: int, now: float) -> SessionView:
    s = session_record(sid, f)
    return SessionView(
        id=sid,
        name=s.name,
        owner=s.owner,
        models=public_models(s.models),
        capacity=s.capacity,
        capacity_source=s.capacity_source,
        active=active,
        upload_mode=s.upload_mode,
        version=s.version,
        served=s.served,
        polling=s.polling > 0,
        idle_s=max(0.0, now - s.last_seen),
        engine=s.engine,
    )
