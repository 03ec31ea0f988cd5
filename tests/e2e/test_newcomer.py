"""The newcomer path with real processes and a real llama.cpp engine.

Start the broker with nothing but ports and a data dir, copy the connector command from its
banner, and use the openai SDK as an API user would; then restart the broker and check that
the old key still works and the connector comes back by itself.
"""

from __future__ import annotations

import re
import shlex
import time

import openai
import pytest

from tests.support.llama import LlamaServer
from tests.support.procs import Broker, Proc, Procs, openai_client

pytestmark = pytest.mark.e2e

KEY_LINE = r"^\s*API key for users:  (sk-[0-9a-f]{32})$"
TOKEN_LINE = r"^\s*Connector token:    (ct-[0-9a-zA-Z_-]+)$"
COMMAND_LINE = r"^\s*(REMOTELLM_BROKER_TOKEN=\S+ uv run remotellm-connector .*)$"
CONNECTOR_NAME = "newcomer-laptop"
RECONNECT_WITHIN_S = 10.0


def connector_from_banner(
    command: str, broker: Broker, token: str, llm_url: str
) -> tuple[dict[str, str], list[str]]:
    """The printed command as environment + ``python -m connector`` arguments, at our llama.

    The token is in the environment form, so it never shows in ``ps``.
    """
    words = shlex.split(command)
    assert words[0] == f"REMOTELLM_BROKER_TOKEN={token}", command
    assert words[1:4] == ["uv", "run", "remotellm-connector"], command
    args = words[4:]
    flags = dict(zip(args[::2], args[1::2], strict=True))
    assert set(flags) == {"--broker-url", "--llm-url"}, command
    assert flags["--broker-url"] == broker.url, command
    flags["--llm-url"] = llm_url
    flags["--name"] = CONNECTOR_NAME
    return {"REMOTELLM_BROKER_TOKEN": token}, [word for pair in flags.items() for word in pair]


def assert_secrets_only_in_banner(
    proc: Proc, secrets: list[str], banner_patterns: list[str]
) -> None:
    for ln in proc.lines:
        leaked = [s for s in secrets if s in ln.text]
        if not leaked:
            continue
        in_banner = ln.stream == "stdout" and any(re.search(p, ln.text) for p in banner_patterns)
        assert in_banner, (
            f"{proc.name} printed a secret outside the banner: [{ln.stream}] {ln.text}"
        )


def assert_no_secrets(proc: Proc, secrets: list[str]) -> None:
    for ln in proc.lines:
        for secret in secrets:
            assert secret not in ln.text, f"{proc.name} printed a secret: [{ln.stream}] {ln.text}"


async def chat_once(base_url: str, key: str) -> str:
    async with openai_client(base_url, key) as client:
        completion = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
        )
    content = completion.choices[0].message.content
    assert content, completion
    return content


async def test_newcomer_path(procs: Procs, llama_server: LlamaServer, tmp_path) -> None:
    data_dir = tmp_path / "broker-data"

    # 1. Nothing but ports and a data dir: the broker makes and prints the credentials.
    broker = await procs.broker(data_dir)
    assert broker.proc is not None
    key = (await broker.proc.wait_line(KEY_LINE, stream="stdout")).group(1)
    token = (await broker.proc.wait_line(TOKEN_LINE, stream="stdout")).group(1)
    command = (await broker.proc.wait_line(COMMAND_LINE, stream="stdout")).group(1)

    # 2. Run the printed connector command (our interpreter instead of `uv run`).
    env, args = connector_from_banner(command, broker, token, llama_server.url)
    connector = await procs.start("connector", "-m", "connector", *args, env=env)
    assert token not in " ".join(connector.args)
    await broker.wait_model("tiny", timeout=20.0, connector=CONNECTOR_NAME, watch=connector)

    async with openai_client(broker.url, key) as client:
        # Non-streaming, with the relay's headers.
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model="tiny", messages=[{"role": "user", "content": "Hello there"}], max_tokens=8
            )
        except openai.APIStatusError as exc:
            raise AssertionError(
                f"the first completion through the relay failed: {exc!r}\n"
                f"--- llama.cpp log ---\n{llama_server.log_text()[-1500:]}\n{connector.tail()}"
            ) from exc
        assert raw.status_code == 200
        assert raw.headers.get("x-request-id"), dict(raw.headers)
        overhead = float(raw.headers["x-remotellm-overhead-ms"])
        assert 0.0 <= overhead < 5000.0, overhead
        completion = raw.parse()
        assert completion.choices[0].message.content, completion
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None and completion.usage.completion_tokens == 8

        # A client's own request ID comes back, as a label beside the broker's UUID.
        raw = await client.chat.completions.with_raw_response.create(
            model="tiny",
            messages=[{"role": "user", "content": "Hello again"}],
            max_tokens=4,
            extra_headers={"x-request-id": "newcomer-req-1"},
        )
        assert raw.headers["x-client-request-id"] == "newcomer-req-1"
        assert "x-remotellm-overhead-ms" in raw.headers

        # Streaming: one chunk per token, arriving while the engine still generates.
        streamed = await client.chat.completions.with_raw_response.create(
            model="tiny",
            messages=[{"role": "user", "content": "Tell me a story"}],
            # 300 tokens: the tiny model can make 100 in ~25 ms, too short to tell a relay
            # that streams from one that buffers when the machine is busy.
            max_tokens=300,
            stream=True,
        )
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert streamed.headers.get("x-request-id")
        stream = streamed.parse()
        arrivals: list[float] = []
        pieces: list[str] = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic())
                pieces.append(chunk.choices[0].delta.content)
        assert len(pieces) >= 150, pieces
        spread = arrivals[-1] - arrivals[0]
        # A relay that buffered the stream would hand the tokens over at once.
        assert spread > 0.04, f"all {len(pieces)} chunks arrived within {spread * 1000:.1f} ms"

        models = await client.models.list()
        assert "tiny" in [m.id for m in models.data]

    # 3. Restart the broker on the same port and data dir.
    broker.proc.signal()
    assert await broker.proc.wait_exit(30.0) == 0
    first_broker = broker.proc
    broker = await procs.broker(data_dir, port=broker.port, name="broker (restarted)")
    assert broker.proc is not None
    await broker.proc.wait_line(r"Using the keys and tokens configured", stream="stdout")
    back_after = await broker.wait_model(
        "tiny", timeout=RECONNECT_WITHIN_S + 5.0, connector=CONNECTOR_NAME, watch=connector
    )
    assert back_after <= RECONNECT_WITHIN_S, f"connector came back after {back_after:.1f} s"
    assert await chat_once(broker.url, key)
    assert len(connector.events("registered")) >= 2, connector.tail()
    connector.assert_alive()

    # 4. Secrets: only in the first banner; never in any log line.
    banner = [KEY_LINE, TOKEN_LINE, COMMAND_LINE]
    assert_secrets_only_in_banner(first_broker, [key, token], banner)
    assert first_broker.text("stderr"), "the broker logged nothing at all"
    assert_no_secrets(broker.proc, [key, token])
    assert "sk-" not in broker.proc.text("stdout")
    assert "Connector token:" not in broker.proc.text("stdout")
    assert_no_secrets(connector, [key, token])
    for path in data_dir.rglob("*"):
        if path.is_file():
            stored = path.read_text(encoding="utf-8", errors="replace")
            assert key not in stored and token not in stored, f"{path} holds a plain secret"

    connector.signal()
    assert await connector.wait_exit(30.0) == 0
