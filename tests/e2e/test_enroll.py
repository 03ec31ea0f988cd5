"""Enrollment with real processes: a connector with no token joins after the operator approves.

The broker and the connector are real processes; the operator's decision is made on the
broker's enrolled-connectors file, which the broker re-reads (the admin page's forms are
tested in tests/portal/test_admin_browser.py).
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from broker.accounts.enrollment import EnrollmentStore
from shared.bench.upstream import FakeLLM
from tests.support.procs import Procs, openai_client

pytestmark = pytest.mark.e2e

KEY = "sk-" + "e" * 32


def _connector_args(broker_url: str, llm_url: str, name: str, data_dir: Path) -> list[str]:
    return [
        "-m",
        "connector",
        "--broker-url",
        broker_url,
        "--llm-url",
        llm_url,
        "--name",
        name,
        "--data-dir",
        str(data_dir),
        "--log-format",
        "json",
        "--capacity",
        "2",
    ]


async def test_connector_enrolls_waits_is_approved_and_serves(
    procs: Procs, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    broker = await procs.broker(
        tmp_path / "broker", "--user-api-key", KEY, "--allow-enrollment", "--log-format", "json"
    )
    data = tmp_path / "conn"
    conn = await procs.start("connector", *_connector_args(broker.url, fake_llm.url, "gpu-1", data))
    waiting = await conn.wait_event(("waiting_for_approval",), timeout=20)
    assert f"{broker.url}/portal/admin" in waiting["message"]
    assert waiting["models"] == ["fake-model"]

    # Restarted while pending: it finds its own request again (one entry, same id).
    await conn.kill()
    conn = await procs.start(
        "connector again", *_connector_args(broker.url, fake_llm.url, "gpu-1", data)
    )
    again = await conn.wait_event(("waiting_for_approval",), timeout=20)
    assert again["enrollment"] == waiting["enrollment"]
    operator = EnrollmentStore(broker.data_dir / "enrolled_connectors.yaml")
    (entry,) = operator.entries
    assert (entry.name, entry.address, entry.models) == ("gpu-1", "127.0.0.1", ["fake-model"])

    operator.approve(entry.id, "operator")
    await conn.wait_event(("enrolled",), timeout=20)
    await broker.wait_model("fake-model", timeout=20, connector="gpu-1", watch=conn)
    credentials = data / "credentials"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert credentials.read_text().startswith("ct-")
    assert not (data / "enrollment-secret").exists()
    async with openai_client(broker.url, KEY) as client:
        reply = await client.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "tokens:3"}]
        )
    assert reply.choices[0].message.content == "tok0 tok1 tok2 "

    # A restart needs no approval: the token comes from <data-dir>/credentials.
    conn.signal()
    assert await conn.wait_exit(20) == 0
    conn = await procs.start(
        "connector restarted", *_connector_args(broker.url, fake_llm.url, "gpu-1", data)
    )
    await conn.wait_event(("registered",), timeout=20)
    assert conn.events("waiting_for_approval") == []


async def test_rejected_enroll_and_a_broker_without_enrollment_exit_1_with_the_reason(
    procs: Procs, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    broker = await procs.broker(tmp_path / "broker", "--user-api-key", KEY, "--allow-enrollment")
    args = _connector_args(broker.url, fake_llm.url, "gpu-2", tmp_path / "c2")
    enroll = await procs.start("connector enroll", args[0], args[1], "enroll", *args[2:])
    await enroll.wait_event(("waiting_for_approval",), timeout=20)
    operator = EnrollmentStore(broker.data_dir / "enrolled_connectors.yaml")
    operator.reject(operator.entries[0].id, "operator")
    assert await enroll.wait_exit(20) == 1
    assert "the operator rejected this connector" in enroll.text("stderr")
    assert not (tmp_path / "c2" / "credentials").exists()

    closed = await procs.broker(
        tmp_path / "closed", "--user-api-key", KEY, "--connector-token", "ct-x"
    )
    args = _connector_args(closed.url, fake_llm.url, "gpu-3", tmp_path / "c3")
    run = await procs.start("connector no token", *args)
    assert await run.wait_exit(20) == 1
    assert "--allow-enrollment" in run.text("stderr")
    assert not (closed.data_dir / "enrolled_connectors.yaml").exists()
