"""What the broker answers on /api/tags, /api/ps and /api/version: only Ollama sessions."""

from __future__ import annotations

from datetime import UTC, datetime

from broker.api.ollama_catalog import ps_body, tags_body, version_body
from broker.state.relay import RelayView, SessionView
from shared.protocol import UploadMode

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def session(sid: str, engine: str, *models: str) -> SessionView:
    return SessionView(
        id=sid,
        name=sid,
        owner="c",
        models=frozenset(models),
        capacity=1,
        capacity_source="configured",
        active=0,
        upload_mode=UploadMode.STREAM,
        version="1",
        served=0,
        engine=engine,
    )


def view(*sessions: SessionView) -> RelayView:
    return RelayView(sessions={s.id: s for s in sessions})


def test_only_ollama_sessions_are_listed() -> None:
    live = view(
        session("a", "ollama/0.6.2", "llama3:8b", "qwen"),
        session("b", "", "plain"),
        session("c", "ollama", "qwen"),
    )
    tags = tags_body(live, NOW)
    assert [m["name"] for m in tags["models"]] == ["llama3:8b", "qwen"]
    assert tags["models"][0]["modified_at"] == "2026-01-02T03:04:05Z"
    assert tags["models"][0]["size"] == 0
    ps = ps_body(live, NOW)
    assert [m["model"] for m in ps["models"]] == ["llama3:8b", "qwen"]
    assert ps["models"][0]["expires_at"] == "2026-01-02T03:09:05Z"


def test_the_version_is_the_oldest_live_ollamas() -> None:
    assert version_body(view()) is None
    assert version_body(view(session("b", "", "plain"))) is None
    two = view(session("a", "ollama/0.10.1", "m"), session("c", "ollama/0.9.6", "m"))
    assert version_body(two) == {"version": "0.9.6"}
    assert version_body(view(session("a", "ollama", "m"))) == {"version": "0.0.0"}
