"""The wheel, installed into a fresh venv outside the source tree, works on its own:
both programs start, the broker prints its credentials, and a chat completion goes
through the installed broker and connector to a fake LLM."""

from __future__ import annotations

import zipfile
from pathlib import Path

from shared.bench.upstream import FakeLLM
from tests.deploy.helpers import (
    BANNER_KEY,
    BANNER_TOKEN,
    DEPLOY,
    REPO,
    base_env,
    chat,
    chat_stream,
    http_status,
    models_ready,
    run,
    running,
    start,
    wait_for,
)
from tests.support.net import free_ports


def test_wheel_contents(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("broker", "connector", "shared"):
        assert f"{package}/__init__.py" in names
    assert not any(name.startswith(("tests/", "deploy/")) for name in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "remotellm-broker = broker.cli.main:main" in text
    assert "remotellm-connector = connector.cli:main" in text


def test_installed_help(wheel_venv: Path, tmp_path: Path) -> None:
    assert not wheel_venv.is_relative_to(REPO)
    for program in ("remotellm-broker", "remotellm-connector"):
        # Run from elsewhere, so nothing can come from the source tree.
        result = run([wheel_venv / "bin" / program, "--help"], env=base_env(), cwd=tmp_path)
        assert "Usage:" in result.stdout and "--config" in result.stdout
    imported = run(
        [wheel_venv / "bin" / "python", "-c", "import broker; print(broker.__file__)"],
        cwd=tmp_path,
    ).stdout
    assert str(wheel_venv) in imported


def test_installed_broker_and_connector_relay(
    wheel_venv: Path, fake_llm: FakeLLM, world_dir: Path
) -> None:
    logs = world_dir / "logs-wheel"
    port, health, connector_health = free_ports(3)
    data_dir = world_dir / "wheel-data"
    broker = start(
        "broker",
        [
            wheel_venv / "bin" / "remotellm-broker",
            *("--host", "127.0.0.1", "--port", str(port), "--health-port", str(health)),
            *("--data-dir", str(data_dir)),
        ],
        logs,
        base_env(PYTHONUNBUFFERED="1"),
    )
    procs = [broker]
    healthcheck = [wheel_venv / "bin" / "python", DEPLOY / "docker" / "healthcheck.py"]
    with running(procs):
        # First start: it creates credentials and prints them once.
        key = wait_for("the key", lambda: BANNER_KEY.search(broker.stdout()), procs).group(1)
        token = wait_for("the token", lambda: BANNER_TOKEN.search(broker.stdout()), procs)
        token = token.group(1)
        assert key.startswith("sk-") and token.startswith("ct-")
        assert (data_dir / "credentials.yaml").exists()
        assert key not in (data_dir / "credentials.yaml").read_text()
        wait_for("/ready", lambda: http_status(f"http://127.0.0.1:{health}/ready") == 200, procs)

        # The Docker HEALTHCHECK script, against the real health port.
        env = base_env(REMOTELLM_BROKER_HEALTH_PORT=str(health))
        assert run([*healthcheck, "REMOTELLM_BROKER_", "8080"], env=env).returncode == 0

        connector = start(
            "connector",
            [
                wheel_venv / "bin" / "remotellm-connector",
                *("--broker-url", f"http://127.0.0.1:{port}", "--broker-token", token),
                *("--llm-url", fake_llm.url, "--name", "wheel-test"),
                *("--health-port", str(connector_health)),
            ],
            logs,
            base_env(PYTHONUNBUFFERED="1"),
        )
        procs.append(connector)
        base = f"http://127.0.0.1:{port}"
        wait_for("the model", lambda: models_ready(base, key, fake_llm.model), procs)
        assert chat(base, key, fake_llm.model) == fake_llm.answer
        text, _ = chat_stream(base, key, fake_llm.model)
        assert text == fake_llm.answer

        env = base_env(REMOTELLM_HEALTH_PORT=str(connector_health))
        assert run([*healthcheck, "REMOTELLM_", "8081"], env=env).returncode == 0

    assert broker.popen.returncode == 0, broker.output()
    assert connector.popen.returncode == 0, connector.output()
    # With the broker gone, the health check fails.
    env = base_env(REMOTELLM_BROKER_HEALTH_PORT=str(health))
    result = run([*healthcheck, "REMOTELLM_BROKER_", "8080"], env=env, check=False)
    assert result.returncode == 1
