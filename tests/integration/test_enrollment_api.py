"""POST /relay/v1/enroll against a real broker: pending, approve, reject, revoke, disabled."""

from __future__ import annotations

from pathlib import Path

import httpx

from broker.accounts.keys import hash_secret
from broker.admin.operations import Actor, decide_connector
from shared.protocol import (
    RELAY_PREFIX,
    EnrollRequest,
    EnrollResponse,
    EnrollStatus,
    RegisterRequest,
)
from tests.support.net import wait_for
from tests.support.stack import RunningBroker, start_broker

SECRET = "e" * 48


def _ask(secret: str = SECRET, name: str = "gpu-box:llm") -> bytes:
    return EnrollRequest(name=name, models=["m1"], secret=secret).model_dump_json().encode()


def _relay(broker: RunningBroker, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=broker.url + RELAY_PREFIX, headers=headers, timeout=10)


def _register() -> bytes:
    return RegisterRequest(name="gpu-box:llm", models=["m1"], capacity=2).model_dump_json().encode()


async def test_without_allow_enrollment_an_unknown_connector_gets_401_and_nothing_is_stored(
    tmp_path: Path,
) -> None:
    broker = await start_broker(tmp_path / "b")
    try:
        async with _relay(broker) as relay:
            r = await relay.post("/enroll", content=_ask())
            assert r.status_code == 401
            error = r.json()["error"]
            assert error["code"] == "enrollment_disabled"
            assert "--allow-enrollment" in error["message"]
            assert set(error) == {"message", "type", "param", "code"}
            # A registration without a token is the same clear 401.
            r = await relay.post("/sessions", content=_register())
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token"
        assert not broker.settings.enrolled_path.exists()
        assert broker.server.state.enrollment is not None
        assert broker.server.state.enrollment.entries == []
    finally:
        await broker.stop()


async def test_pending_is_idempotent_approve_gives_a_working_token_once_then_revoke(
    tmp_path: Path,
) -> None:
    broker = await start_broker(tmp_path / "b", allow_enrollment=True, poll_wait=1.0)
    store = broker.server.state.enrollment
    assert store is not None
    try:
        async with _relay(broker) as relay:
            answers = [await relay.post("/enroll", content=_ask()) for _ in range(5)]
            assert {a.status_code for a in answers} == {202}
            replies = [EnrollResponse.model_validate_json(a.content) for a in answers]
            assert {r.enrollment_id for r in replies} == {replies[0].enrollment_id}
            assert replies[0].status is EnrollStatus.PENDING and replies[0].token is None
            (entry,) = store.entries
            assert entry.address == "127.0.0.1" and entry.models == ["m1"]

            store.approve(entry.id, "root")
            r = await relay.post("/enroll", content=_ask())
            assert r.status_code == 200, r.text
            token = EnrollResponse.model_validate_json(r.content).token
            assert token is not None and token.startswith("ct-")
            assert token not in broker.settings.enrolled_path.read_text()
            assert hash_secret(token) in broker.settings.enrolled_path.read_text()
            # Exactly once: the same secret now starts a new request, it gets no token.
            r = await relay.post("/enroll", content=_ask())
            assert r.status_code == 202 and r.json()["token"] is None

        async with _relay(broker, token) as conn:
            r = await conn.post("/sessions", content=_register())
            assert r.status_code == 200, r.text
            session_id = r.json()["session_id"]
            assert broker.hub.core.sessions[session_id].owner == entry.id

            # Revoked: the session ends and the token stops working at once.
            await decide_connector(broker.server.state, Actor("cli:root"), "revoke", entry.id)
            assert session_id not in broker.hub.core.sessions
            r = await conn.post(f"/sessions/{session_id}/poll", content=b"{}")
            assert r.status_code == 401
            r = await conn.post("/sessions", content=_register())
            assert r.status_code == 401
    finally:
        await broker.stop()


async def test_rejected_connector_is_told_so(tmp_path: Path) -> None:
    broker = await start_broker(tmp_path / "b", allow_enrollment=True)
    store = broker.server.state.enrollment
    assert store is not None
    try:
        async with _relay(broker) as relay:
            r = await relay.post("/enroll", content=_ask())
            store.reject(r.json()["enrollment_id"], "root")
            r = await relay.post("/enroll", content=_ask())
            assert r.status_code == 403
            reply = EnrollResponse.model_validate_json(r.content)
            assert reply.status is EnrollStatus.REJECTED and "rejected" in reply.message
            # Bad input is a 400 in OpenAI's shape.
            r = await relay.post("/enroll", content=b'{"name": "x", "secret": "short"}')
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    finally:
        await broker.stop()


async def test_enrolled_file_edits_are_picked_up_without_a_restart(tmp_path: Path) -> None:
    broker = await start_broker(tmp_path / "b", allow_enrollment=True)
    store = broker.server.state.enrollment
    assert store is not None
    try:
        async with _relay(broker) as relay:
            r = await relay.post("/enroll", content=_ask())
            store.approve(r.json()["enrollment_id"], "root")
            token = (await relay.post("/enroll", content=_ask())).json()["token"]
        # Another store (the operator's copy of the file) sets the upstream key.
        from broker.accounts.enrollment import EnrollmentStore

        other = EnrollmentStore(broker.settings.enrolled_path)
        other.set_llm_key(other.entries[0].id, "sk-upstream-1")
        keys = broker.server.state.keys

        def seen() -> bool:
            ident = keys.connector(token)
            return ident is not None and ident.upstream_api_key == "sk-upstream-1"

        await wait_for(seen, timeout=10)
    finally:
        await broker.stop()


async def test_a_revocation_written_to_the_file_ends_the_sessions_too(tmp_path: Path) -> None:
    broker = await start_broker(tmp_path / "b", allow_enrollment=True, poll_wait=1.0)
    store = broker.server.state.enrollment
    assert store is not None
    try:
        async with _relay(broker) as relay:
            r = await relay.post("/enroll", content=_ask())
            store.approve(r.json()["enrollment_id"], "root")
            token = (await relay.post("/enroll", content=_ask())).json()["token"]
        async with _relay(broker, token) as conn:
            r = await conn.post("/sessions", content=_register())
            session_id = r.json()["session_id"]
            # The operator edits the file by hand (another process's store).
            from broker.accounts.enrollment import EnrollmentStore

            other = EnrollmentStore(broker.settings.enrolled_path)
            other.revoke(other.entries[0].id, "operator")
            core = broker.hub.core
            await wait_for(lambda: session_id not in core.sessions, timeout=10)
            r = await conn.post("/sessions", content=_register())
            assert r.status_code == 401
    finally:
        await broker.stop()


async def test_check_without_a_token_says_to_enroll(tmp_path: Path) -> None:
    from connector.check import run_check
    from connector.settings import ConnectorSettings

    broker = await start_broker(tmp_path / "b", allow_enrollment=True)
    try:
        settings = ConnectorSettings(
            broker_url=broker.url, data_dir=tmp_path / "conn", llm_url=broker.url
        )
        lines: list[str] = []
        ok = await run_check(settings, lines.append)
        assert not ok
        (token_line,) = [line for line in lines if "token" in line and "no connector" in line]
        assert "remotellm-connector enroll" in "\n".join(lines)
        assert token_line
    finally:
        await broker.stop()
