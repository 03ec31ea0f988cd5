"""``remotellm-broker``: thin click front end over ``BrokerSettings`` and ``serve``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from broker.keys import GeneratedCredentials, KeyStore
from broker.settings import BrokerSettings
from broker.users_cli import users_command
from shared.errors import ConfigError
from shared.logging import configure_logging, get_logger
from shared.settings import load_settings, options_from_settings
from shared.templates import render


def connector_command(settings: BrokerSettings, token: str) -> str:
    return (
        "uv run remotellm-connector "
        f"--broker-url {settings.advertised_url} --broker-token {token} "
        "--llm-url http://localhost:11434"
    )


def banner(settings: BrokerSettings, creds: GeneratedCredentials, keys: KeyStore) -> str:
    token = creds.connector_token
    return render(
        "banner.txt.j2",
        user_key=creds.user_key,
        connector_token=token,
        connector_command=connector_command(settings, token) if token else None,
        credentials_path=keys.credentials_path,
        base_url=settings.advertised_url,
        health_url=f"http://{settings.health_host}:{settings.health_port}"
        if settings.health_port
        else None,
    )


def prepare(settings: BrokerSettings) -> tuple[KeyStore, GeneratedCredentials]:
    """Load keys; create credentials when none exist (or refuse, if told not to)."""
    keys = KeyStore(
        static_user_keys=settings.user_api_keys,
        static_connector_tokens=settings.connector_tokens,
        connector_config=settings.connector_config,
        data_dir=settings.data_dir,
    )
    # With the key portal on, users get their keys there: no generated user key needed.
    has_users = keys.has_users or settings.portal_enabled
    if has_users and keys.has_connectors:
        return keys, GeneratedCredentials(None, None)
    if not settings.generate_credentials:
        missing = [
            name
            for name, ok in (
                ("--user-api-key", has_users),
                ("--connector-token", keys.has_connectors),
            )
            if not ok
        ]
        raise ConfigError(
            "refusing to start an open broker: give "
            + " and ".join(missing)
            + " (or allow --generate-credentials)"
        )
    return keys, keys.ensure_credentials()


@click.group(
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    envvar="REMOTELLM_BROKER_CONFIG",
    help="YAML file with any of the settings below (keys as the option names).",
)
@options_from_settings(BrokerSettings)
@click.version_option(package_name="remotellm")
@click.pass_context
def main(ctx: click.Context, /, config_file: Path | None, **options: Any) -> None:
    """Run the RemoteLLM broker: an OpenAI-compatible API relayed to connectors.

    With no options it starts on 0.0.0.0:8443, creates a user API key and a connector
    token in its data dir on first start, and prints them with the connector command to
    run next. Every option can also be set as REMOTELLM_BROKER_<NAME> or in --config.
    `remotellm-broker [OPTIONS] users ...` manages the key portal's users file instead.
    """
    if ctx.invoked_subcommand is not None:
        ctx.obj = (config_file, options)
        return
    from broker.server import serve

    try:
        settings = load_settings(BrokerSettings, config_file, options)
        configure_logging(settings.log_level, settings.log_format)
        keys, creds = prepare(settings)
    except ConfigError as exc:
        click.echo(f"remotellm-broker: {exc}", err=True)
        sys.exit(2)
    click.echo(banner(settings, creds, keys))
    sys.stdout.flush()
    get_logger("broker.cli").info("broker_configured", data_dir=str(settings.data_dir))
    from broker.app import build_state

    serve(settings, build_state(settings, keys))


main.add_command(users_command)
