from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from pydantic_settings import BaseSettings

from broker.cli import main as broker_cli
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


@pytest.mark.parametrize(
    ("command", "text", "message"),
    [
        (broker_cli.main, "captacity: 8\n", "unknown setting 'captacity' in {path}"),
        (connector_cli.main, "captacity: 8\n",
         "unknown setting 'captacity' in {path} (did you mean 'capacity'?)"),
    ],
)  # fmt: skip
def test_misspelled_config_key_exits_2_without_traceback(
    tmp_path: Path, command: click.Command, text: str, message: str
) -> None:
    config = tmp_path / "settings.yaml"
    config.write_text(text, encoding="utf-8")
    result = _run(command, ["--config", str(config)])
    assert result.exit_code == 2
    assert message.format(path=config) in result.stderr
    assert "Traceback" not in result.stderr


def test_certfile_without_keyfile_exits_2(tmp_path: Path) -> None:
    result = _run(broker_cli.main, ["--certfile", str(tmp_path / "c.pem")])
    assert result.exit_code == 2
    assert "--certfile needs --keyfile too" in result.stderr


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
    assert command.startswith(f"REMOTELLM_BROKER_TOKEN={creds.connector_token} uv run ")
    assert "--broker-token" not in command
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


# -- init-credentials (what the service installers call) ----------------------------------

KEY_LINE = re.compile(r"^    API key for users:  (sk-[0-9a-f]{32})$", re.M)
TOKEN_LINE = re.compile(r"^    Connector token:    (ct-[0-9a-f]{48})$", re.M)


def test_init_credentials_creates_once_and_prints_secrets_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = _run(broker_cli.main, ["init-credentials", "--data-dir", str(data_dir)])
    assert first.exit_code == 0, first.output
    key_match, token_match = KEY_LINE.search(first.stdout), TOKEN_LINE.search(first.stdout)
    assert key_match and token_match, first.stdout
    key, token = key_match.group(1), token_match.group(1)
    assert f"REMOTELLM_BROKER_TOKEN={token} uv run remotellm-connector" in first.stdout

    # Stored as hashes only, where the broker looks for them.
    stored = (data_dir / "credentials.yaml").read_text()
    assert key not in stored and token not in stored
    settings = _broker_settings(tmp_path)
    keys, creds = broker_cli.prepare(settings)
    assert (creds.user_key, creds.connector_token) == (None, None)
    assert keys.user(key) is not None and keys.connector(token) is not None

    again = _run(broker_cli.main, ["init-credentials", "--data-dir", str(data_dir)])
    assert again.exit_code == 0
    assert "nothing created" in again.stdout
    assert key not in again.stdout and token not in again.stdout
    assert (data_dir / "credentials.yaml").read_text() == stored


def test_init_credentials_ignores_static_keys_and_takes_options_first(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("REMOTELLM_BROKER_USER_API_KEYS", "sk-static")
    data_dir = tmp_path / "data"
    result = _run(
        broker_cli.main,
        [
            "--public-url",
            "https://llm.example.com",
            "init-credentials",
            "--data-dir",
            str(data_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    assert KEY_LINE.search(result.stdout)
    assert "--broker-url https://llm.example.com " in result.stdout


def test_init_credentials_bad_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text("data-dirr: /x\n", encoding="utf-8")
    result = _run(broker_cli.main, ["init-credentials", "--config", str(config)])
    assert result.exit_code == 2
    assert "unknown setting 'data-dirr'" in result.stderr and "Traceback" not in result.stderr
