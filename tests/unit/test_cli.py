from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from pydantic_settings import BaseSettings

from broker import cli as broker_cli
from broker.settings import BrokerSettings
from connector import cli as connector_cli
from connector.settings import ConnectorSettings
from shared.errors import ConfigError
from shared.settings import flag_for, load_settings

pytestmark = pytest.mark.usefixtures("clean_env")

COMMANDS = [
    pytest.param(broker_cli.main, BrokerSettings, "REMOTELLM_BROKER_", id="broker"),
    pytest.param(connector_cli.main, ConnectorSettings, "REMOTELLM_", id="connector"),
]


def _run(command: click.Command, args: list[str]):
    return CliRunner().invoke(command, args, catch_exceptions=False)


@pytest.mark.parametrize(("command", "cls", "prefix"), COMMANDS)
def test_help_lists_every_setting(
    command: click.Command, cls: type[BaseSettings], prefix: str
) -> None:
    result = _run(command, ["--help"])
    assert result.exit_code == 0, result.output
    help_text = result.output
    assert "--config" in help_text
    for name, field in cls.model_fields.items():
        flag = flag_for(name, field)
        assert re.search(re.escape(flag) + r"(?![\w-])", help_text), flag
        if field.annotation is bool:
            assert "--no-" + flag[2:] in help_text
        # click wraps help text, so the env variable may be split across lines
        assert prefix + name.upper() in re.sub(r"\s+", "", help_text), name


@pytest.mark.parametrize(("command", "cls", "prefix"), COMMANDS)
def test_short_help_option(command: click.Command, cls: type[BaseSettings], prefix: str) -> None:
    assert _run(command, ["-h"]).exit_code == 0


@pytest.mark.parametrize(
    ("args", "flag", "words"),
    [
        (["--port", "http"], "--port", "integer"),
        (["--port", "99999"], "--port", "65535"),
        (["--log-format", "xml"], "--log-format", "json"),
        (["--lease", "-1"], "--lease", "greater than 0"),
    ],
)
def test_broker_invalid_option_exits_2(
    tmp_path: Path, args: list[str], flag: str, words: str
) -> None:
    result = _run(broker_cli.main, [*args, "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "remotellm-broker:" in result.stderr
    assert flag in result.stderr
    assert words in result.stderr
    assert list(tmp_path.iterdir()) == []  # refused before creating anything


REQUIRED = ["--broker-url", "https://b.example", "--broker-token", "ct-x"]


@pytest.mark.parametrize(
    ("args", "flag", "words"),
    [
        ([*REQUIRED, "--capacity", "0"], "--capacity", "between 1 and 10000"),
        ([*REQUIRED, "--capacity", "lots"], "--capacity", "a positive whole number or auto"),
        ([*REQUIRED, "--upload-mode", "pigeon"], "--upload-mode", "stream"),
        (["--broker-url", "ftp://b", "--broker-token", "t"], "--broker-url", "http"),
        (["--broker-token", "t"], "--broker-url", "required"),
        (["--broker-url", "https://b"], "--broker-token", "required"),
    ],
)
def test_connector_invalid_option_exits_2(args: list[str], flag: str, words: str) -> None:
    result = _run(connector_cli.main, args)
    assert result.exit_code == 2
    assert "remotellm-connector:" in result.stderr
    assert re.search(re.escape(flag) + r"(?![\w-])", result.stderr)
    assert words in result.stderr.lower() or words in result.stderr


def test_unknown_option_exits_2() -> None:
    result = _run(connector_cli.main, ["--no-such-option"])
    assert result.exit_code == 2
    assert "--no-such-option" in result.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = _run(broker_cli.main, ["--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2


# -- broker start-up without a server ------------------------------------------------------


def _broker_settings(tmp_path: Path, **overrides: object) -> BrokerSettings:
    return load_settings(BrokerSettings, None, {"data_dir": str(tmp_path / "data"), **overrides})


@pytest.mark.parametrize(
    ("overrides", "missing"),
    [
        ({}, ["--user-api-key", "--connector-token"]),
        ({"user_api_keys": ("sk-a",)}, ["--connector-token"]),
        ({"connector_tokens": ("ct-a",)}, ["--user-api-key"]),
    ],
)
def test_prepare_refuses_open_broker(
    tmp_path: Path, overrides: dict[str, object], missing: list[str]
) -> None:
    settings = _broker_settings(tmp_path, generate_credentials=False, **overrides)
    with pytest.raises(ConfigError) as info:
        broker_cli.prepare(settings)
    for flag in missing:
        assert flag in str(info.value)
    assert not (tmp_path / "data").exists()


def test_prepare_with_static_keys_generates_nothing(tmp_path: Path) -> None:
    settings = _broker_settings(
        tmp_path, generate_credentials=False, user_api_keys=("sk-a",), connector_tokens=("ct-a",)
    )
    keys, creds = broker_cli.prepare(settings)
    assert (creds.user_key, creds.connector_token) == (None, None)
    assert keys.user("sk-a") is not None
    banner = broker_cli.banner(settings, creds, keys)
    assert "sk-a" not in banner and "ct-a" not in banner


def test_prepare_generates_credentials_and_banner_shows_them(tmp_path: Path) -> None:
    settings = _broker_settings(tmp_path, public_url="https://llm.example.com")
    keys, creds = broker_cli.prepare(settings)
    assert creds.user_key is not None and creds.connector_token is not None
    assert keys.user(creds.user_key) is not None
    assert keys.connector(creds.connector_token) is not None

    banner = broker_cli.banner(settings, creds, keys)
    assert creds.user_key in banner
    assert creds.connector_token in banner
    assert "https://llm.example.com/v1" in banner
    command = broker_cli.connector_command(settings, creds.connector_token)
    assert command in banner
    assert f"--broker-token {creds.connector_token}" in command
    assert "--broker-url https://llm.example.com" in command
    assert "remotellm-connector" in command

    # The next start finds them and shows no secret.
    keys2, creds2 = broker_cli.prepare(settings)
    assert (creds2.user_key, creds2.connector_token) == (None, None)
    banner2 = broker_cli.banner(settings, creds2, keys2)
    assert creds.user_key not in banner2
    assert creds.connector_token not in banner2


def test_banner_health_line(tmp_path: Path) -> None:
    on = _broker_settings(tmp_path, user_api_keys=("k",), connector_tokens=("t",))
    keys, creds = broker_cli.prepare(on)
    assert "http://127.0.0.1:8080/health" in broker_cli.banner(on, creds, keys)
    off = _broker_settings(tmp_path, health_port="0")
    assert "Health server: off" in broker_cli.banner(off, creds, keys)
