"""Write the example config files in deploy/examples/ from the settings classes.

    uv run python deploy/gen_examples.py           # rewrite the examples
    uv run python deploy/gen_examples.py --check   # exit 1 if they are out of date

Every setting is listed, commented out, with its flag, help text and default, so the
examples cannot miss an option: tests/deploy checks that each environment variable and
YAML key of BrokerSettings and ConnectorSettings appears in them.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterable
from enum import Enum
from pathlib import Path

import yaml
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from broker.settings import BrokerSettings
from connector.settings import ConnectorSettings
from shared.settings import default_text, flag_for

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE / "examples"
WIDTH = 88

# Values the systemd units and the Docker images set for a service (the env files
# show these rather than the interactive defaults, which point into a home dir).
SERVICE_VALUES: dict[str, dict[str, str]] = {
    "broker": {
        "data_dir": "/var/lib/remotellm/broker",
        "connector_config": "/etc/remotellm/connectors.yaml",
    },
    "connector": {},
}

ENV_HEADER = """\
# {path}: settings of the RemoteLLM {component} service ({program}).
#
# Read by the systemd unit (EnvironmentFile=) and usable as a Docker env file.
# Every option is listed below, commented out, with its default: uncomment and
# edit what you need, then: systemctl restart remotellm-{component}
# Precedence: command-line flags > these variables > a --config YAML file > defaults.
# Syntax: NAME=value, one per line, no quotes needed; lists are comma-separated.
# This file may hold secrets: keep it owned by root, group remotellm, mode 0640.
# (Generated from {source} by deploy/gen_examples.py.)
"""

YAML_HEADER = """\
# {component}.yaml: settings of the RemoteLLM {component} ({program} --config FILE).
#
# Every option is listed below, commented out, with its default: uncomment and
# edit what you need. Keys are the option names (dashes or underscores); a key
# that is not a setting is an error.
# Precedence: command-line flags > environment variables > this file > defaults.
# This file may hold secrets: keep it readable only by the service's user.
# (Generated from {source} by deploy/gen_examples.py.)
"""

CONNECTORS_YAML = """\
# connectors.yaml: the connectors allowed to serve this broker, one entry each.
#
# Pointed to by REMOTELLM_BROKER_CONNECTOR_CONFIG (--connector-config). The broker
# re-reads it when it changes: add or remove a connector without a restart.
# Each entry:
#   token:        the secret the connector sends (its REMOTELLM_BROKER_TOKEN);
#                 make one with: python3 -c 'import secrets; print("ct-" + secrets.token_hex(24))'
#   name:         optional, shown in logs and /health
#   id:           optional, the connector's ID in sessions and usage records (default:
#                 c- and 8 hex digits of the token's SHA-256, stable when entries move)
#   llm_api_key:  optional, sent to that connector's local LLM as its API key
# Tokens from REMOTELLM_BROKER_CONNECTOR_TOKENS and the generated ones in the data dir
# are accepted as well. Keep this file owned by root, group remotellm, mode 0640.

connectors: []
# connectors:
#   - token: ct-REPLACE-WITH-A-LONG-RANDOM-SECRET
#     name: gpu-box
#   - token: ct-REPLACE-WITH-ANOTHER-SECRET
#     name: laptop
#     llm_api_key: sk-local-llm-key
"""


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH - 2, break_on_hyphens=False) or [""]


def _default_value(field: FieldInfo) -> object:
    if field.is_required():
        return None
    value = field.get_default(call_default_factory=True)
    extra = field.json_schema_extra
    if isinstance(extra, dict) and "doc_default" in extra:
        return None  # host-dependent (home dir, host name): shown in words instead
    return value


def _env_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _yaml_value(value: object) -> str:
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, Path):
        value = str(value)
    if value is None:
        return ""
    dumped = yaml.safe_dump(value, default_flow_style=True).strip()
    return dumped.removesuffix("\n...").removesuffix("...").strip()


def _fields(cls: type[BaseSettings]) -> Iterable[tuple[str, FieldInfo]]:
    return cls.model_fields.items()


def _note(field: FieldInfo, shown_default: str | None) -> str:
    if field.is_required():
        return "required"
    if shown_default is not None:
        return f"the service sets {shown_default}"
    default = default_text(field)
    return f"default: {default}" if default else "default: not set"


def env_example(component: str, cls: type[BaseSettings], program: str, source: str) -> str:
    prefix = str(cls.model_config.get("env_prefix", ""))
    out = [
        ENV_HEADER.format(
            path=f"/etc/remotellm/{component}.env",
            component=component,
            program=program,
            source=source,
        ).rstrip("\n")
    ]
    service = SERVICE_VALUES[component]
    for name, field in _fields(cls):
        env = prefix + name.upper()
        service_value = service.get(name)
        value = service_value if service_value is not None else _env_value(_default_value(field))
        out.append("")
        out.extend(
            "# " + line
            for line in _wrap(
                f"{field.description} ({flag_for(name, field)}; {_note(field, service_value)})"
            )
        )
        out.append(f"#{env}={value}")
    config_env = _config_envvar(program)
    out.append("")
    out.extend(
        "# " + line
        for line in _wrap(
            "A YAML file with any of the settings above (--config; keys as the option "
            "names), for those who prefer YAML; the variables here win over it."
        )
    )
    out.append(f"#{config_env}=/etc/remotellm/{component}.yaml")
    return "\n".join(out) + "\n"


def yaml_example(component: str, cls: type[BaseSettings], program: str, source: str) -> str:
    prefix = str(cls.model_config.get("env_prefix", ""))
    out = [YAML_HEADER.format(component=component, program=program, source=source).rstrip("\n")]
    for name, field in _fields(cls):
        env = prefix + name.upper()
        value = _yaml_value(_default_value(field))
        out.append("")
        out.extend(
            "# " + line
            for line in _wrap(
                f"{field.description} ({flag_for(name, field)}, {env}; {_note(field, None)})"
            )
        )
        out.append(f"#{name}: {value}".rstrip())
    return "\n".join(out) + "\n"


def _config_envvar(program: str) -> str:
    """The variable naming the --config file, as the command line declares it."""
    if program == "remotellm-broker":
        from broker.cli.main import main as command
    else:
        from connector.cli import main as command
    for param in command.params:
        if param.name == "config_file" and isinstance(param.envvar, str):
            return param.envvar
    raise LookupError(f"{program} has no --config option with an environment variable")


def render() -> dict[str, str]:
    broker = ("broker", BrokerSettings, "remotellm-broker", "broker/settings.py")
    connector = ("connector", ConnectorSettings, "remotellm-connector", "connector/settings.py")
    return {
        "broker.env.example": env_example(*broker),
        "connector.env.example": env_example(*connector),
        "broker.yaml.example": yaml_example(*broker),
        "connector.yaml.example": yaml_example(*connector),
        "connectors.yaml.example": CONNECTORS_YAML,
    }


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, text in render().items():
        path = EXAMPLES / name
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(name)
        if not check:
            EXAMPLES.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(HERE.parent)}")
    if check and stale:
        print("out of date: " + ", ".join(stale) + " (run: uv run python deploy/gen_examples.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
