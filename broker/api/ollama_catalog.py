"""What the broker answers itself on Ollama's ``/api/tags``, ``/api/ps`` and ``/api/version``.

Pure: built from a ``RelayView`` (the live sessions) and the time. Only sessions whose
engine is Ollama count. The broker knows each model's name and which connectors serve it,
not its file: ``size``, ``digest`` and ``details`` are empty placeholders, ``modified_at``
is the time of the answer, and ``/api/ps`` lists every served model (not only those
loaded in GPU memory) with ``size_vram`` 0 and ``expires_at`` five minutes ahead
(Ollama's default keep-alive). docs/clients.md lists the synthesized fields.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from broker.state.relay import RelayView, SessionView
from shared.paths import OLLAMA_ENGINE, engine_kind

__all__ = ["ollama_models", "ps_body", "tags_body", "version_body"]

KEEP_ALIVE = timedelta(minutes=5)
_NUMBERS = re.compile(r"\d+")


def ollama_sessions(view: RelayView) -> list[SessionView]:
    return [s for s in view.sessions.values() if engine_kind(s.engine) == OLLAMA_ENGINE]


def ollama_models(view: RelayView) -> list[str]:
    """The models live Ollama connectors serve, sorted."""
    return sorted({m for s in ollama_sessions(view) for m in s.models})


def _details() -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "",
        "family": "",
        "families": None,
        "parameter_size": "",
        "quantization_level": "",
    }


def _stamp(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def tags_body(view: RelayView, now: datetime) -> dict[str, Any]:
    models = [
        {
            "name": m,
            "model": m,
            "modified_at": _stamp(now),
            "size": 0,
            "digest": "",
            "details": _details(),
        }
        for m in ollama_models(view)
    ]
    return {"models": models}


def ps_body(view: RelayView, now: datetime) -> dict[str, Any]:
    expires = _stamp(now + KEEP_ALIVE)
    models = [
        {
            "name": m,
            "model": m,
            "size": 0,
            "digest": "",
            "details": _details(),
            "expires_at": expires,
            "size_vram": 0,
        }
        for m in ollama_models(view)
    ]
    return {"models": models}


def _order(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in _NUMBERS.findall(version)[:4])


def version_body(view: RelayView) -> dict[str, Any] | None:
    """The oldest version among live Ollama connectors (what every one of them can do);
    None when none is live."""
    versions = [s.engine.partition("/")[2] for s in ollama_sessions(view)]
    known = [v for v in versions if v]
    if not versions:
        return None
    return {"version": min(known, key=_order) if known else "0.0.0"}


def utc_now() -> datetime:
    return datetime.now(UTC)
