"""``remotellm-broker``: thin click front end over ``BrokerSettings`` and ``serve``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import click

from broker.accounts.keys import GeneratedCredentials, KeyStore
from broker.cli.admin_tokens import admin_tokens_command
from broker.cli.audit import audit_command
from broker.cli.program import BROKER
from broker.cli.usage import usage_command
from broker.cli.users import users_command
from broker.settings import BrokerSettings
from shared.errors import ConfigError
from shared.logging import configure_logging, get_logger
from shared.settings import CLI_CONTEXT, options_from_settings
from shared.templates import render


def connector_command(settings: BrokerSettings, token: str) -> str:
    """The connector's command line, with the token in the environment (not in ``ps``)."""
    return (
        f"REMOTELLM_BROKER_TOKEN={shlex.quote(token)} uv run remotellm-connector "
        f"--broker-url {shlex.quote(settings.advertised_url)} "
        "--llm-url http://localhost:11434"
    )


def _credentials_context(
    settings: BrokerSettings, creds: GeneratedCredentials, keys: KeyStore
) -> dict[str, object]:
    token = creds.connector_token
    return {
        "user_key": creds.user_key,
        "connector_token": token,
        "connector_command": connector_command(settings, token) if token else None,
        "credentials_path": keys.credentials_path,
    }


def banner(settings: BrokerSettings, creds: GeneratedCredentials, keys: KeyStore) -> str:
    return render(
        "banner.txt.j2",
        **_credentials_context(settings, creds, keys),
        base_url=settings.advertised_url,
        health_url=f"http://{settings.health_host}:{settings.health_port}"
        if settings.health_port
        else None,
    )


def init_credentials(settings: BrokerSettings) -> str:
    """Create the data dir's credentials when it has none; say what was made (secrets once).

    Only ``credentials.yaml`` counts here, not static keys: this is how installers make the
    first key and token without writing them into a settings file in plain text.
    """
    keys = KeyStore(
        static_user_keys=[],
        static_connector_tokens=[],
        connector_config=None,
        data_dir=settings.data_dir,
    )
    creds = keys.ensure_credentials()
    if creds.user_key is None and creds.connector_token is None:
        return f"  Credentials exist in {keys.credentials_path}: nothing created.\n"
    return render("credentials.txt.j2", **_credentials_context(settings, creds, keys))


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
    # Enrolled connectors get their tokens on /portal/admin: no generated token needed.
    has_connectors = keys.has_connectors or settings.allow_enrollment
    if has_users and has_connectors:
        return keys, GeneratedCredentials(None, None)
    if not settings.generate_credentials:
        missing = [
            name
            for name, ok in (
                ("--user-api-key", has_users),
                ("--connector-token", has_connectors),
            )
            if not ok
        ]
        raise ConfigError(
            "refusing to start an open broker: give "
            + " and ".join(missing)
            + " (or allow --generate-credentials)"
        )
    return keys, keys.ensure_credentials()


@click.group(context_settings=CLI_CONTEXT, invoke_without_command=True)
@BROKER.config_option
@options_from_settings(BrokerSettings)
@click.version_option(package_name="remotellm")
@click.pass_context
def main(ctx: click.Context, /, config_file: Path | None, **options: Any) -> None:
    """Run the RemoteLLM broker: an OpenAI-compatible API relayed to connectors.

    With no options it starts on 0.0.0.0:8443, creates a user API key and a connector
    token in its data dir on first start, and prints them with the connector command to
    run next. Every option can also be set as REMOTELLM_BROKER_<NAME> or in --config.

    `remotellm-broker init-credentials` creates those credentials without starting;
    `remotellm-broker [OPTIONS] users ...` manages the key portal's users file;
    `remotellm-broker [OPTIONS] usage ...` prints usage totals from the ledger.
    """
    if ctx.invoked_subcommand is not None:
        # Options given before the subcommand apply to it too.
        BROKER.remember(ctx, config_file, options)
        return
    from broker.malloc import return_large_buffers
    from broker.server import serve

    settings = BROKER.load(config_file, options)
    from broker.composition import build_state

    return_large_buffers()

    try:
        configure_logging(settings.log_level, settings.log_format)
        keys, creds = prepare(settings)
        state = build_state(settings, keys)
    except ConfigError as exc:
        BROKER.fail(str(exc), 2)
    click.echo(banner(settings, creds, keys))
    sys.stdout.flush()
    get_logger("broker.cli.main").info("broker_configured", data_dir=str(settings.data_dir))
    serve(settings, state)


@main.command("init-credentials", context_settings=CLI_CONTEXT)
@BROKER.config_option
@click.option(
    "--data-dir",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The broker's data dir (as --data-dir of the broker).",
)
@click.option("--public-url", default=None, help="The broker's URL, for the connector command.")
@click.pass_context
def init_credentials_command(
    ctx: click.Context, /, config_file: Path | None, data_dir: Path | None, public_url: str | None
) -> None:
    """Create a user API key and a connector token in the data dir, unless it has some.

    Stores only their hashes (credentials.yaml, as the first start does) and prints the
    secrets this once. Exits 0 when the credentials already exist (and prints none).
    """
    options = {"data_dir": data_dir, "public_url": public_url}
    settings = BROKER.load_sub(ctx, config_file, options)
    try:
        click.echo(init_credentials(settings), nl=False)
    except (ConfigError, OSError) as exc:
        BROKER.fail(str(exc), 2)


main.add_command(users_command)
main.add_command(usage_command)
main.add_command(audit_command)
main.add_command(admin_tokens_command)
