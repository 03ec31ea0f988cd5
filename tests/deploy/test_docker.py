"""Dockerfiles, compose.yaml and .dockerignore, checked without a Docker engine: what
they copy exists and reaches the build, what they run exists, what they set is a real
setting. The health check script is run for real in test_wheel.py."""

from __future__ import annotations

import fnmatch
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from pydantic_settings import BaseSettings

from broker.settings import BrokerSettings
from connector.settings import ConnectorSettings
from tests.deploy.helpers import REPO, entry_points, env_names, pyproject

DOCKERFILES = {"broker": REPO / "Dockerfile.broker", "connector": REPO / "Dockerfile.connector"}
SETTINGS: dict[str, type[BaseSettings]] = {"broker": BrokerSettings, "connector": ConnectorSettings}
PREFIXES = {"broker": "REMOTELLM_BROKER_", "connector": "REMOTELLM_"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def instructions(path: Path) -> list[Instruction]:
    """Dockerfile instructions, continuation lines joined, comments dropped."""
    result: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        result.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, f"{path.name} ends in a continuation line"
    return result


def dockerignore_excludes(rel_path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = rel_path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        if pat.startswith("**/"):
            matches = any(fnmatch.fnmatch(Path(c).name, pat[3:]) for c in candidates)
        else:
            matches = any(fnmatch.fnmatch(c, pat) for c in candidates)
        if matches:
            excluded = not negate
    return excluded


def copy_sources(inst: Instruction) -> list[str]:
    words = shlex.split(inst.args)
    if any(w.startswith("--from") for w in words):
        return []
    words = [w for w in words if not w.startswith("--")]
    return words[:-1]


@pytest.mark.parametrize("component", sorted(DOCKERFILES))
def test_dockerfile(component: str) -> None:
    path = DOCKERFILES[component]
    insts = instructions(path)
    keywords = [i.keyword for i in insts]

    args = {i.args.split("=", 1)[0]: i.args.split("=", 1)[1] for i in insts if i.keyword == "ARG"}
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    froms = [i.args for i in insts if i.keyword == "FROM"]
    assert froms[0].startswith("${PYTHON_IMAGE} AS ") and froms[-1] == "${PYTHON_IMAGE}"

    # Everything copied from the context exists and is not excluded by .dockerignore.
    sources = [src for i in insts if i.keyword == "COPY" for src in copy_sources(i)]
    for src in sources:
        assert (REPO / src).exists(), f"{path.name}: COPY {src}: no such file"
        assert not dockerignore_excludes(src), f"{path.name}: COPY {src} is in .dockerignore"
    # ... including every package the wheel is built from, and the lock.
    packages = pyproject()["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    force_included = pyproject()["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    for needed in [*packages, *force_included, "pyproject.toml", "uv.lock", "README.md"]:
        assert needed in sources, f"{path.name} does not copy {needed}"
    runs = " ".join(i.args for i in insts if i.keyword == "RUN")
    assert "uv sync --frozen --no-dev" in runs, "dependencies must come from uv.lock"

    # Runs as an unprivileged user, the program named by the entry point.
    users = [i.args for i in insts if i.keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    entrypoint = [i.args for i in insts if i.keyword == "ENTRYPOINT"][-1]
    assert entrypoint == f'["remotellm-{component}"]'
    assert f"remotellm-{component}" in entry_points()
    assert keywords.index("USER") > keywords.index("RUN", keywords.index("COPY"))

    # The REMOTELLM_* variables it sets are real settings.
    env_text = " ".join(i.args for i in insts if i.keyword == "ENV")
    env_vars = dict(re.findall(r"(\w+)=(\S+)", env_text))
    for name in env_vars:
        if name.startswith("REMOTELLM_"):
            assert name in env_names(SETTINGS[component]), f"{path.name}: no setting {name}"

    # The health check asks the health port the program really serves.
    check = [i.args for i in insts if i.keyword == "HEALTHCHECK"][-1]
    cmd = yaml.safe_load(check[check.index("CMD") + 3 :])  # the exec form is a JSON list
    assert cmd[1] == "/opt/remotellm/healthcheck.py"
    assert cmd[2] == PREFIXES[component]
    port_var = f"{PREFIXES[component]}HEALTH_PORT"
    default_port = SETTINGS[component].model_fields["health_port"].default
    expected = env_vars.get(port_var) or str(default_port)
    assert cmd[3] == expected, "HEALTHCHECK default port differs from the health port"
    stop = [i.args for i in insts if i.keyword == "STOPSIGNAL"]
    assert stop == ["SIGTERM"]


def test_dockerignore_keeps_secrets_and_clutter_out() -> None:
    for path in (".venv/bin/python", ".git/config", "tests/unit/test_cli.py", "x/.env"):
        assert dockerignore_excludes(path), path
    for path in ("broker/cli/main.py", "uv.lock", "deploy/docker/healthcheck.py"):
        assert not dockerignore_excludes(path), path
    assert dockerignore_excludes("broker/__pycache__/cli.cpython-311.pyc")


def test_compose() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"broker", "connector", "ollama"}
    assert services["ollama"]["image"].startswith("ollama/ollama")
    for component in ("broker", "connector"):
        service = services[component]
        build = service["build"]
        assert (REPO / build["context"] / build["dockerfile"]) == DOCKERFILES[component]
        for name in service["environment"]:
            assert name in env_names(SETTINGS[component]), f"{component}: no setting {name}"
        grace = int(service["stop_grace_period"].rstrip("s"))
        assert grace > SETTINGS[component].model_fields["drain_timeout"].default
    broker_env = services["broker"]["environment"]
    connector_env = services["connector"]["environment"]
    # One secret shared: the connector presents the token the broker accepts.
    token = re.match(r"\$\{(\w+)", connector_env["REMOTELLM_BROKER_TOKEN"])
    assert token and token.group(1) in broker_env["REMOTELLM_BROKER_CONNECTOR_TOKENS"]
    assert connector_env["REMOTELLM_BROKER_URL"] == "http://broker:8443"
    assert connector_env["REMOTELLM_LLM_URL"] == "http://ollama:11434"
    assert services["connector"]["depends_on"]["broker"]["condition"] == "service_healthy"
    volume = services["broker"]["volumes"][0].split(":")
    data_dir = dict(re.findall(r"(\w+)=(\S+)", (REPO / "Dockerfile.broker").read_text()))[
        "REMOTELLM_BROKER_DATA_DIR"
    ]
    assert volume[1] == data_dir and volume[0] in compose["volumes"]
