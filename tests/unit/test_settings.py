from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from broker.settings import BrokerSettings
from connector.settings import NAME_MAX, ConnectorSettings, default_name
from shared.errors import ConfigError
from shared.protocol import UploadMode
from shared.settings import load_settings

pytestmark = pytest.mark.usefixtures("clean_env")

REQUIRED_ENV = {"REMOTELLM_BROKER_URL": "https://b.example", "REMOTELLM_BROKER_TOKEN": "ct-x"}


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _flag_named(message: str, flag: str) -> bool:
    """``flag`` appears as a whole option name (``--model`` does not match ``--models``)."""
    return re.search(re.escape(flag) + r"(?![\w-])", message) is not None


def test_broker_defaults() -> None:
    s = load_settings(BrokerSettings, None, {})
    assert (s.host, s.port, s.poll_wait, s.lease, s.max_redispatch) == ("0.0.0.0", 8443, 25, 15, 2)
    assert s.user_api_keys == [] and s.connector_tokens == []
    assert s.generate_credentials is True
    assert s.data_dir == Path.home() / ".local" / "share" / "remotellm" / "broker"
    assert s.advertised_url == "http://127.0.0.1:8443"


def test_connector_defaults(clean_env: pytest.MonkeyPatch) -> None:
    s = load_settings(ConnectorSettings, None, {"broker_url": "https://b", "broker_token": "t"})
    assert (s.llm_url, s.capacity, s.upload_mode) == (
        "http://localhost:11434",
        "auto",
        UploadMode.AUTO,
    )
    assert s.models == []
    assert s.name == default_name("http://localhost:11434")
    assert s.health_port is None


@pytest.mark.parametrize(
    ("file", "env", "cli", "expected"),
    [
        (None, None, None, 8443),
        (1001, None, None, 1001),
        (None, 1002, None, 1002),
        (None, None, 1003, 1003),
        (1001, 1002, None, 1002),
        (1001, None, 1003, 1003),
        (None, 1002, 1003, 1003),
        (1001, 1002, 1003, 1003),
    ],
)
def test_broker_precedence(
    clean_env: pytest.MonkeyPatch,
    tmp_path: Path,
    file: int | None,
    env: int | None,
    cli: int | None,
    expected: int,
) -> None:
    config = _yaml(tmp_path, f"port: {file}\nhost: 10.0.0.1\n") if file else None
    if env:
        clean_env.setenv("REMOTELLM_BROKER_PORT", str(env))
    overrides: dict[str, Any] = {"port": str(cli) if cli else None, "host": None}
    s = load_settings(BrokerSettings, config, overrides)
    assert s.port == expected
    # A field set nowhere but the file still comes from the file.
    assert s.host == ("10.0.0.1" if file else "0.0.0.0")


@pytest.mark.parametrize(
    ("file", "env", "cli", "expected"),
    [
        (None, None, None, "auto"),
        (7, None, None, 7),
        (7, 8, None, 8),
        (7, 8, 9, 9),
        (None, 8, 9, 9),
        (7, None, 9, 9),
    ],
)
def test_connector_precedence(
    clean_env: pytest.MonkeyPatch,
    tmp_path: Path,
    file: int | None,
    env: int | None,
    cli: int | None,
    expected: int | str,
) -> None:
    for k, v in REQUIRED_ENV.items():
        clean_env.setenv(k, v)
    config = _yaml(tmp_path, f"capacity: {file}\n") if file else None
    if env:
        clean_env.setenv("REMOTELLM_CAPACITY", str(env))
    s = load_settings(ConnectorSettings, config, {"capacity": str(cli) if cli else None})
    assert s.capacity == expected


def test_required_connector_settings_from_file(tmp_path: Path) -> None:
    config = _yaml(tmp_path, "broker-url: https://from.file/\nbroker_token: ct-file\n")
    s = load_settings(ConnectorSettings, config, {})
    assert (s.broker_url, s.broker_token) == ("https://from.file", "ct-file")


def test_yaml_keys_may_use_dashes(tmp_path: Path) -> None:
    config = _yaml(tmp_path, "poll-wait: 3.5\nuser-api-keys: [sk-a, sk-b]\n")
    s = load_settings(BrokerSettings, config, {})
    assert s.poll_wait == 3.5
    assert s.user_api_keys == ["sk-a", "sk-b"]


@pytest.mark.parametrize(
    ("cls", "text", "field", "expected"),
    [
        (BrokerSettings, "user-api-key: sk-a\n", "user_api_keys", ["sk-a"]),
        (BrokerSettings, "connector_token: [ct-a]\n", "connector_tokens", ["ct-a"]),
        (ConnectorSettings, "model: [m1, m2]\nbroker_url: https://b\nbroker_token: t\n",
         "models", ["m1", "m2"]),
    ],
)  # fmt: skip
def test_yaml_keys_may_use_flag_names(
    tmp_path: Path, cls: type[Any], text: str, field: str, expected: object
) -> None:
    s = load_settings(cls, _yaml(tmp_path, text), {})
    assert getattr(s, field) == expected


@pytest.mark.parametrize(
    ("cls", "text", "key", "hint"),
    [
        (ConnectorSettings, "captacity: 8\n", "captacity", "capacity"),
        (BrokerSettings, "pol-wait: 3\n", "pol-wait", "poll_wait"),
        (BrokerSettings, "port: 1\nqueue_maxx: 3\n", "queue_maxx", "queue_max"),
        (BrokerSettings, "zzz: 1\n", "zzz", None),
    ],
)
def test_unknown_yaml_key_is_an_error_naming_it(
    tmp_path: Path, cls: type[Any], text: str, key: str, hint: str | None
) -> None:
    config = _yaml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(cls, config, {})
    suggestion = f" (did you mean {hint!r}?)" if hint else ""
    assert str(info.value) == f"unknown setting {key!r} in {config}{suggestion}"


def test_yaml_key_given_twice_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'poll_wait' is given twice"):
        load_settings(BrokerSettings, _yaml(tmp_path, "poll-wait: 1\npoll_wait: 2\n"), {})


def test_unrelated_env_variables_with_the_prefix_are_ignored(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("REMOTELLM_BROKER_SOMETHING_ELSE", "1")
    assert load_settings(BrokerSettings, None, {}).port == 8443


@pytest.mark.parametrize(
    ("overrides", "given", "missing"),
    [
        ({"certfile": "/c.pem"}, "--certfile", "--keyfile"),
        ({"keyfile": "/k.pem"}, "--keyfile", "--certfile"),
    ],
)
def test_certfile_and_keyfile_go_together(
    overrides: dict[str, Any], given: str, missing: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(BrokerSettings, None, overrides)
    assert f"{given} needs {missing} too" in str(info.value)


def test_certfile_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=f"--certfile {missing}: no such file"):
        load_settings(BrokerSettings, None, {"certfile": str(missing), "keyfile": __file__})


@pytest.mark.parametrize(
    ("cls", "env", "value", "field", "expected"),
    [
        (BrokerSettings, "REMOTELLM_BROKER_USER_API_KEYS", "sk-a,sk-b", "user_api_keys",
         ["sk-a", "sk-b"]),
        (BrokerSettings, "REMOTELLM_BROKER_USER_API_KEYS", " sk-a , ,sk-b,", "user_api_keys",
         ["sk-a", "sk-b"]),
        (BrokerSettings, "REMOTELLM_BROKER_USER_API_KEYS", "sk-only", "user_api_keys",
         ["sk-only"]),
        (BrokerSettings, "REMOTELLM_BROKER_CONNECTOR_TOKENS", "ct-1,ct-2,ct-3",
         "connector_tokens", ["ct-1", "ct-2", "ct-3"]),
        (ConnectorSettings, "REMOTELLM_MODELS", "llama3:8b,qwen2.5:7b", "models",
         ["llama3:8b", "qwen2.5:7b"]),
        (ConnectorSettings, "REMOTELLM_MODELS", "", "models", []),
    ],
)  # fmt: skip
def test_comma_separated_env_lists(
    clean_env: pytest.MonkeyPatch,
    cls: type[BrokerSettings | ConnectorSettings],
    env: str,
    value: str,
    field: str,
    expected: list[str],
) -> None:
    for k, v in REQUIRED_ENV.items():
        clean_env.setenv(k, v)
    clean_env.setenv(env, value)
    assert getattr(load_settings(cls, None, {}), field) == expected


def test_repeated_cli_option_beats_env(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("REMOTELLM_BROKER_USER_API_KEYS", "sk-env")
    given = load_settings(BrokerSettings, None, {"user_api_keys": ("sk-a", "sk-b")})
    assert given.user_api_keys == ["sk-a", "sk-b"]
    # click passes () for a repeatable option that was not given: the env still counts.
    absent = load_settings(BrokerSettings, None, {"user_api_keys": ()})
    assert absent.user_api_keys == ["sk-env"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("false", False), ("0", False), ("no", False), ("true", True), ("1", True)],
)
def test_bool_from_env(clean_env: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    clean_env.setenv("REMOTELLM_BROKER_GENERATE_CREDENTIALS", value)
    assert load_settings(BrokerSettings, None, {}).generate_credentials is expected


@pytest.mark.parametrize(
    ("cls", "source", "name", "value", "flag", "env"),
    [
        (BrokerSettings, "cli", "port", "http", "--port", "REMOTELLM_BROKER_PORT"),
        (BrokerSettings, "env", "port", "70000", "--port", "REMOTELLM_BROKER_PORT"),
        (BrokerSettings, "file", "port", "-1", "--port", "REMOTELLM_BROKER_PORT"),
        (BrokerSettings, "cli", "lease", "0", "--lease", "REMOTELLM_BROKER_LEASE"),
        (BrokerSettings, "env", "queue_max", "0", "--queue-max", "REMOTELLM_BROKER_QUEUE_MAX"),
        (BrokerSettings, "cli", "log_format", "xml", "--log-format",
         "REMOTELLM_BROKER_LOG_FORMAT"),
        (BrokerSettings, "env", "max_request_body", "10", "--max-request-body",
         "REMOTELLM_BROKER_MAX_REQUEST_BODY"),
        (BrokerSettings, "file", "user_api_keys", "{a: 1}", "--user-api-key",
         "REMOTELLM_BROKER_USER_API_KEYS"),
        (ConnectorSettings, "cli", "capacity", "0", "--capacity", "REMOTELLM_CAPACITY"),
        (ConnectorSettings, "env", "capacity", "many", "--capacity", "REMOTELLM_CAPACITY"),
        (ConnectorSettings, "cli", "upload_mode", "carrier-pigeon", "--upload-mode",
         "REMOTELLM_UPLOAD_MODE"),
        (ConnectorSettings, "file", "llm_read_timeout", "-5", "--llm-read-timeout",
         "REMOTELLM_LLM_READ_TIMEOUT"),
        (ConnectorSettings, "file", "models", "{a: 1}", "--model", "REMOTELLM_MODELS"),
    ],
)  # fmt: skip
def test_invalid_value_names_flag_and_env(
    clean_env: pytest.MonkeyPatch,
    tmp_path: Path,
    cls: type[BrokerSettings | ConnectorSettings],
    source: str,
    name: str,
    value: str,
    flag: str,
    env: str,
) -> None:
    for k, v in REQUIRED_ENV.items():
        clean_env.setenv(k, v)
    config = None
    overrides: dict[str, Any] = {}
    if source == "cli":
        overrides[name] = value
    elif source == "env":
        clean_env.setenv(env, value)
    else:
        config = _yaml(tmp_path, f"{name}: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cls, config, overrides)
    message = str(info.value)
    assert _flag_named(message, flag), message
    assert env in message


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://llm.example.com", True),
        ("http://127.0.0.1:8443", True),
        ("ftp://llm.example.com", False),
        ("llm.example.com", False),
        ("ws://llm.example.com", False),
        ("", False),
    ],
)
def test_connector_broker_url_must_be_http(url: str, ok: bool) -> None:
    overrides = {"broker_url": url, "broker_token": "t"}
    if ok:
        assert load_settings(ConnectorSettings, None, overrides).broker_url == url
    else:
        with pytest.raises(ConfigError) as info:
            load_settings(ConnectorSettings, None, overrides)
        assert _flag_named(str(info.value), "--broker-url")
        assert "REMOTELLM_BROKER_URL" in str(info.value)


def test_urls_lose_trailing_slash() -> None:
    s = load_settings(
        ConnectorSettings,
        None,
        {"broker_url": "https://b.example/", "broker_token": "t", "llm_url": "http://l:1/"},
    )
    assert (s.broker_url, s.llm_url) == ("https://b.example", "http://l:1")


def test_llm_url_must_be_http() -> None:
    with pytest.raises(ConfigError, match="--llm-url"):
        load_settings(
            ConnectorSettings,
            None,
            {"broker_url": "https://b", "broker_token": "t", "llm_url": "localhost:11434"},
        )


def test_missing_required_connector_settings() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(ConnectorSettings, None, {})
    message = str(info.value)
    assert "--broker-url" in message and "REMOTELLM_BROKER_URL" in message
    # No token is not an error: the connector then asks to enroll (docs/enrollment.md).
    assert "--broker-token" not in message


@pytest.mark.parametrize("text", ["port: [unclosed\n", "- a\n- list\n", "just a string\n"])
def test_bad_config_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="config file"):
        load_settings(BrokerSettings, _yaml(tmp_path, text), {})


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(BrokerSettings, tmp_path / "nope.yaml", {})


def test_config_file_does_not_leak_into_next_load(tmp_path: Path) -> None:
    load_settings(BrokerSettings, _yaml(tmp_path, "port: 1234\n"), {})
    assert load_settings(BrokerSettings, None, {}).port == 8443


@pytest.mark.parametrize(
    ("overrides", "url"),
    [
        ({}, "http://127.0.0.1:8443"),
        ({"host": "::", "port": "9000"}, "http://127.0.0.1:9000"),
        ({"host": "10.1.2.3", "certfile": __file__, "keyfile": __file__}, "https://10.1.2.3:8443"),
        ({"public_url": "https://llm.example.com/"}, "https://llm.example.com"),
    ],
)
def test_advertised_url(overrides: dict[str, Any], url: str) -> None:
    assert load_settings(BrokerSettings, None, overrides).advertised_url == url


# -- the connector's name ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("llm_url", "expected"),
    [
        ("http://localhost:11434", "gpu-box:localhost-11434"),
        ("http://127.0.0.1:8080", "gpu-box:127.0.0.1-8080"),
        ("http://localhost:8000/v1", "gpu-box:localhost-8000-v1"),
        ("https://llm.lan", "gpu-box:llm.lan"),
        ("http://[::1]:1234", "gpu-box:1-1234"),
        ("http://user:pw@host:9/a b", "gpu-box:host-9-a-b"),
    ],
)
def test_default_name_is_host_and_llm_address(llm_url: str, expected: str) -> None:
    assert default_name(llm_url, host="gpu-box") == expected


def test_default_names_differ_per_llm_and_repeat_per_restart() -> None:
    urls = ["http://localhost:11434", "http://localhost:8080", "http://localhost:8000"]
    names = [default_name(u, host="h") for u in urls]
    assert len(set(names)) == 3
    assert names == [default_name(u, host="h") for u in urls]  # a restart: the same names


def test_long_default_names_stay_within_limit_and_distinct() -> None:
    host = "h" * 300
    a = default_name("http://localhost:1", host=host)
    b = default_name("http://localhost:2", host=host)
    assert len(a) <= NAME_MAX and len(b) <= NAME_MAX
    assert a != b


def test_settings_derive_the_name_from_the_llm_url(clean_env: pytest.MonkeyPatch) -> None:
    for k, v in REQUIRED_ENV.items():
        clean_env.setenv(k, v)
    one = load_settings(ConnectorSettings, None, {"llm_url": "http://localhost:8080"})
    two = load_settings(ConnectorSettings, None, {"llm_url": "http://localhost:8081"})
    assert one.name != two.name and one.name.endswith(":localhost-8080")
    given = load_settings(ConnectorSettings, None, {"name": "gpu-0"})
    assert given.name == "gpu-0"


# -- capacity ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [("auto", "auto"), ("AUTO", "auto"), (" 8 ", 8), ("1", 1), (10_000, 10_000), ("64", 64)],
)
def test_capacity_accepts_numbers_and_auto(
    clean_env: pytest.MonkeyPatch, given: object, expected: object
) -> None:
    for k, v in REQUIRED_ENV.items():
        clean_env.setenv(k, v)
    assert load_settings(ConnectorSettings, None, {"capacity": given}).capacity == expected


@pytest.mark.parametrize("given", ["0", "-3", "10001", "many", "4.5", ""])
def test_capacity_refuses_anything_else(clean_env: pytest.MonkeyPatch, given: str) -> None:
    for k, v in REQUIRED_ENV.items():
        clean_env.setenv(k, v)
    clean_env.setenv("REMOTELLM_CAPACITY", given)
    with pytest.raises(ConfigError) as info:
        load_settings(ConnectorSettings, None, {})
    assert _flag_named(str(info.value), "--capacity")
    assert "auto" in str(info.value)


# -- where the token comes from ---------------------------------------------------------


def _token_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "token"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("flag", "ct-flag"),
        ("env", "ct-env"),
        ("file", "ct-file"),
        ("yaml", "ct-yaml"),
    ],
)
def test_token_from_each_source(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, source: str, expected: str
) -> None:
    clean_env.setenv("REMOTELLM_BROKER_URL", "https://b.example")
    given: dict[str, Any] = {}
    config = None
    if source == "flag":
        given["broker_token"] = "ct-flag"
    elif source == "env":
        clean_env.setenv("REMOTELLM_BROKER_TOKEN", "ct-env")
    elif source == "file":
        given["broker_token_file"] = str(_token_file(tmp_path, "  ct-file\n\n"))
    else:
        config = _yaml(tmp_path, "broker_token: ct-yaml\n")
    s = load_settings(ConnectorSettings, config, given)
    assert s.token == expected


def test_token_file_from_the_environment(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("REMOTELLM_BROKER_URL", "https://b.example")
    clean_env.setenv("REMOTELLM_BROKER_TOKEN_FILE", str(_token_file(tmp_path, "ct-f\n")))
    assert load_settings(ConnectorSettings, None, {}).token == "ct-f"


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        ("both", "not both"),
        ("empty", "is empty"),
        ("blank", "is empty"),
        ("missing", "cannot read the token file"),
        ("directory", "cannot read the token file"),
    ],
)
def test_token_source_errors_are_clear(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, setup: str, words: str
) -> None:
    clean_env.setenv("REMOTELLM_BROKER_URL", "https://b.example")
    given: dict[str, Any] = {}
    if setup == "both":
        given = {"broker_token": "ct-x", "broker_token_file": str(_token_file(tmp_path, "ct-y"))}
    elif setup == "empty":
        given = {"broker_token_file": str(_token_file(tmp_path, ""))}
    elif setup == "blank":
        given = {"broker_token_file": str(_token_file(tmp_path, " \n\t\n"))}
    elif setup == "missing":
        given = {"broker_token_file": str(tmp_path / "nope")}
    elif setup == "directory":
        given = {"broker_token_file": str(tmp_path)}
    with pytest.raises(ConfigError) as info:
        load_settings(ConnectorSettings, None, given)
    message = str(info.value)
    assert words in message
    assert _flag_named(message, "--broker-token-file")
    assert "ct-x" not in message and "ct-y" not in message  # a token is never echoed


def test_no_token_means_enrollment_and_an_enrolled_token_is_read_back(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_env.setenv("REMOTELLM_BROKER_URL", "https://b.example")
    s = load_settings(ConnectorSettings, None, {"data_dir": str(tmp_path)})
    assert s.broker_token is None and s.credentials_path == tmp_path / "credentials"
    with pytest.raises(ValueError, match="remotellm-connector enroll"):
        _ = s.token
    (tmp_path / "credentials").write_text("ct-enrolled\n", encoding="utf-8")
    assert load_settings(ConnectorSettings, None, {"data_dir": str(tmp_path)}).token == (
        "ct-enrolled"
    )


def test_token_is_not_in_the_settings_repr() -> None:
    s = ConnectorSettings(broker_url="https://b", broker_token="ct-secret-123")
    assert "ct-secret-123" not in repr(s)


def test_redis_sentinels_come_with_a_master_name(clean_env: pytest.MonkeyPatch) -> None:
    assert not load_settings(BrokerSettings, None, {}).redis_configured
    clean_env.setenv("REMOTELLM_BROKER_REDIS_SENTINELS", "10.0.0.1:26379,[::1]:26380")
    with pytest.raises(ConfigError, match="--redis-sentinel-master"):
        load_settings(BrokerSettings, None, {})
    clean_env.setenv("REMOTELLM_BROKER_REDIS_SENTINEL_MASTER", "remotellm")
    s = load_settings(BrokerSettings, None, {})
    assert s.redis_sentinels == ["10.0.0.1:26379", "[::1]:26380"] and s.redis_configured
    with pytest.raises(ConfigError, match="is not host:port"):
        load_settings(BrokerSettings, None, {"redis_sentinels": ["sentinel-1"]})
