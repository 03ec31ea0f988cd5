"""Small helpers: connectors that are expected to fail, the broker's health, plain requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import sys
from pathlib import Path
from typing import Any

import httpx

from connector.runner import Connector
from connector.settings import ConnectorSettings
from tests.support.net import free_port, wait_for
from tests.support.stack import TOKEN, USER_KEY, RunningBroker

REPO_ROOT = Path(__file__).resolve().parents[2]


def connector_settings(broker_url: str, llm_url: str, **overrides: Any) -> ConnectorSettings:
    values: dict[str, Any] = {
        "broker_url": broker_url,
        "broker_token": TOKEN,
        "llm_url": llm_url,
        "name": "conn-" + str(free_port()),
        "capacity": 4,
        "upload_mode": "auto",
        "drain_timeout": 2.0,
    }
    values.update(overrides)
    return ConnectorSettings(**values)


async def connector_error(settings: ConnectorSettings, timeout: float = 10.0) -> str:
    """Run a connector until it reports a broker error; it must not have registered."""
    connector = Connector(settings)
    task = asyncio.create_task(connector.run())
    try:
        await wait_for(lambda: connector.status.broker_error is not None, timeout)
        assert connector.status.session_id is None
        return connector.status.broker_error or ""
    finally:
        connector.request_stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def broker_health(broker: RunningBroker) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
        response = await client.get(broker.health_url + "/health")
    result: dict[str, Any] = response.json()
    return result


async def chat(
    base_url: str,
    content: str = "hi",
    max_tokens: int = 3,
    verify: Any = True,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """A non-streamed chat completion as an API user (never through an env proxy)."""
    if isinstance(verify, str):
        verify = ssl.create_default_context(cafile=verify)
    async with httpx.AsyncClient(timeout=30.0, trust_env=False, verify=verify) as client:
        return await client.post(
            base_url + "/v1/chat/completions",
            json={
                "model": "fake-model",
                "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": content}],
            },
            headers={"Authorization": f"Bearer {USER_KEY}", **(headers or {})},
        )


def content_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(json.loads(response.text)["choices"][0]["message"]["content"])


async def run_check_cli(*args: str, **env: str) -> tuple[int, str]:
    """``python -m connector check ...`` as a user runs it: exit code and output."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("REMOTELLM_")}
    child_env.update(env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "connector",
        "check",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
        env=child_env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode() + err.decode()
    assert proc.returncode is not None
    return proc.returncode, text
