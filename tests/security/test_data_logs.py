"""Console logs and connector errors: what a request can put in a log or an error text.

Attacks: an API user names a model with terminal escapes and a line break, which the
broker's console log printed raw (clearing the operator's screen, forging a log line); a
connector whose LLM URL holds credentials failed with a text naming that URL, and the
broker passed it to the API user; a connector told to use a plain http:// broker on
another host said nothing. Real processes throughout.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.support.net import free_port
from tests.support.procs import Procs
from tests.support.stack import TOKEN, USER_KEY

pytestmark = pytest.mark.e2e

# No whitespace: the console renderer printed such a string raw (it quotes only strings
# with spaces or line breaks); a second name also tries a line break.
EVIL_MODEL = "evil\x1b[2J\x1b]0;pwned\x07\x1b[31m"
EVIL_LINE = "evil\nFORGED_EVENT\x1b[2J"
LLM_SECRET = "s3cret-llm-pass"


async def chat(url: str, model: str) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=60.0) as client:
        return await client.post(
            f"{url}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {USER_KEY}"},
        )


async def test_console_log_escapes_control_characters(procs: Procs, tmp_path: Path) -> None:
    broker = await procs.broker(
        tmp_path / "data", "--user-api-key", USER_KEY, "--log-format", "console"
    )
    assert broker.proc is not None
    for model in (EVIL_MODEL, EVIL_LINE):
        r = await chat(broker.url, model)
        assert 400 <= r.status_code < 500
    for logged in ("pwned", "FORGED"):
        await broker.proc.wait_line(logged, stream="stderr")
    text = broker.proc.text("stderr")
    assert "\x1b" not in text and "\x07" not in text
    assert not any(line.startswith("FORGED_EVENT") for line in text.splitlines())
    assert "\\x1b[2J" in text  # the operator still sees what was sent, escaped


async def test_api_user_never_sees_the_llm_url_or_its_credentials(
    procs: Procs, tmp_path: Path
) -> None:
    broker = await procs.broker(
        tmp_path / "data",
        "--user-api-key", USER_KEY,
        "--connector-token", TOKEN,
        "--log-format", "json",
    )  # fmt: skip
    llm_port = free_port()  # nothing listens there: the connector cannot reach its LLM
    llm_url = f"http://llm-admin:{LLM_SECRET}@127.0.0.1:{llm_port}"
    connector = await procs.connector(
        broker.url, TOKEN, llm_url, "creds", "--model", "fake-model", "--log-format", "console"
    )
    await broker.wait_model("fake-model", timeout=30, watch=connector)
    r = await chat(broker.url, "fake-model")
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert error["code"] == "upstream_unreachable"
    for leaked in (LLM_SECRET, "llm-admin", str(llm_port), "127.0.0.1"):
        assert leaked not in r.text, r.text
    # The operator's log keeps the detail, with the credentials redacted.
    await connector.wait_line("upstream_request_failed", stream="stderr")
    assert LLM_SECRET not in connector.text()
    assert LLM_SECRET not in broker.proc.text()  # type: ignore[union-attr]
    assert not connector.events("broker_url_cleartext")  # loopback: no warning
    assert "broker_url_cleartext" not in connector.text()


async def test_connector_warns_about_a_cleartext_broker_url(procs: Procs) -> None:
    connector = await procs.connector(
        "http://broker.example.invalid:8080",
        TOKEN,
        "http://127.0.0.1:9",
        "cleartext",
        "--model", "fake-model",
        "--log-format", "json",
    )  # fmt: skip
    event = await connector.wait_event(("broker_url_cleartext",), timeout=30)
    assert event["level"] == "warning"
    assert event["broker_url"] == "http://broker.example.invalid:8080"
