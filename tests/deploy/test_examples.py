"""The example config files list every setting, name no setting that does not exist, and
are valid when uncommented."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import yaml
from pydantic_settings import BaseSettings

from broker.accounts.keys import KeyStore
from broker.settings import BrokerSettings
from connector.settings import ConnectorSettings
from shared.settings import load_settings
from tests.deploy.helpers import DEPLOY, env_names, parse_env_file

EXAMPLES = DEPLOY / "examples"
COMPONENTS: dict[str, type[BaseSettings]] = {
    "broker": BrokerSettings,
    "connector": ConnectorSettings,
}
CONFIG_ENVVARS = {"broker": "REMOTELLM_BROKER_CONFIG", "connector": "REMOTELLM_CONFIG"}
REQUIRED_CONNECTOR = {
    "REMOTELLM_BROKER_URL": "https://llm.example.com",
    "REMOTELLM_BROKER_TOKEN": "ct-example",
}


def commented_assignments(path: Path, pattern: str) -> dict[str, str]:
    return dict(re.findall(pattern, path.read_text(encoding="utf-8"), flags=re.M))


def env_assignments(path: Path) -> dict[str, str]:
    return commented_assignments(path, r"^#(REMOTELLM_[A-Z0-9_]+)=(.*)$")


def yaml_assignments(path: Path) -> dict[str, str]:
    return commented_assignments(path, r"^#([a-z0-9_]+):(.*)$")


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_env_example_lists_every_setting(component: str) -> None:
    cls = COMPONENTS[component]
    listed = env_assignments(EXAMPLES / f"{component}.env.example")
    missing = env_names(cls) - set(listed)
    unknown = set(listed) - env_names(cls) - {CONFIG_ENVVARS[component]}
    assert not missing, f"not in {component}.env.example: {sorted(missing)}"
    assert not unknown, f"no such setting: {sorted(unknown)}"


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_yaml_example_lists_every_setting(component: str) -> None:
    cls = COMPONENTS[component]
    listed = yaml_assignments(EXAMPLES / f"{component}.yaml.example")
    assert set(listed) == set(cls.model_fields)


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_env_example_uncommented_is_valid(
    component: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every value shown, uncommented, is accepted (and is the default or the service's)."""
    text = (EXAMPLES / f"{component}.env.example").read_text()
    uncommented = tmp_path / "all.env"
    uncommented.write_text(re.sub(r"^#(REMOTELLM_)", r"\1", text, flags=re.M))
    env = parse_env_file(uncommented)
    env.pop(CONFIG_ENVVARS[component])  # names a file that does not exist here
    for name in list(env):
        if env[name] == "" or name.endswith("CONNECTOR_CONFIG"):
            del env[name]  # "not set" / a file that does not exist here
    if component == "connector":
        env.update(REQUIRED_CONNECTOR)
    for name in list(os.environ):
        if name.startswith("REMOTELLM_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(COMPONENTS[component], None, {})
    if component == "broker":
        assert str(settings.data_dir) == "/var/lib/remotellm/broker"  # type: ignore[attr-defined]


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_yaml_example_uncommented_is_valid(
    component: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (EXAMPLES / f"{component}.yaml.example").read_text()
    lines = [
        line[1:]
        for line in text.splitlines()
        if re.match(r"^#[a-z0-9_]+: \S", line)  # those with a value
    ]
    data = yaml.safe_load("\n".join(lines))
    if component == "connector":
        data.update(broker_url="https://llm.example.com", broker_token="ct-example")
    config = tmp_path / f"{component}.yaml"
    config.write_text(yaml.safe_dump(data))
    for name in list(os.environ):
        if name.startswith("REMOTELLM_"):
            monkeypatch.delenv(name)
    settings = load_settings(COMPONENTS[component], config, {})
    defaults = COMPONENTS[component](**data)
    assert settings == defaults


def test_connectors_example_loads_and_grants_nothing(tmp_path: Path) -> None:
    """Installed as it is, it must not let anyone in with a placeholder token."""
    example = EXAMPLES / "connectors.yaml.example"
    keys = KeyStore(
        static_user_keys=[],
        static_connector_tokens=[],
        connector_config=example,
        data_dir=tmp_path,
    )
    assert not keys.has_connectors
    # The commented entries show the real format.
    text = example.read_text()
    sample_block = text[text.index("\n# connectors:\n") :].splitlines()[1:]
    sample = yaml.safe_load("\n".join(line[2:] for line in sample_block))
    assert all("token" in entry for entry in sample["connectors"])


def test_examples_are_generated_from_the_settings() -> None:
    """Not hand-edited, and not stale: else run `uv run python deploy/gen_examples.py`."""
    spec = importlib.util.spec_from_file_location("gen_examples", DEPLOY / "gen_examples.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for name, text in gen.render().items():
        assert (EXAMPLES / name).read_text() == text, (
            f"deploy/examples/{name} is out of date: run uv run python deploy/gen_examples.py"
        )
