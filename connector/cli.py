"""``remotellm-connector``: thin click front end over ``ConnectorSettings`` and ``Connector``."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import click

from connector.errors import EnrollmentRefused
from connector.settings import ConnectorSettings, cleartext_broker, default_data_dir
from shared.logging import configure_logging, get_logger
from shared.loop import run
from shared.settings import CLI_CONTEXT, ProgramSettings, options_from_settings


async def run_connector(settings: ConnectorSettings) -> None:
    from connector.enroll import enrolled_settings
    from connector.health import HealthServer
    from connector.runner import Connector

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if cleartext_broker(settings.broker_url):
        get_logger("connector.cli").warning(
            "broker_url_cleartext",
            broker_url=settings.broker_url,
            hint="use https:// (the token, prompts and answers cross the network in clear)",
        )
    # No token: ask the broker to enroll this connector and wait for the operator.
    enrolled = await enrolled_settings(settings, stop)
    if enrolled is None:
        return
    settings = enrolled
    connector = Connector(settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, connector.request_stop)
    health: HealthServer | None = None
    if settings.health_port is not None:
        health = HealthServer(connector, settings.health_host, settings.health_port)
        await health.start()
    log = get_logger("connector.cli")
    log.info(
        "connector_started",
        broker_url=settings.broker_url,
        llm_url=settings.llm_url,
        name=settings.name,
        capacity=settings.capacity,
        health_port=health.port if health else None,
    )
    try:
        await connector.run()
    finally:
        if health is not None:
            await health.close()


CONNECTOR = ProgramSettings(ConnectorSettings, "remotellm-connector", "REMOTELLM_CONFIG")


@click.group(context_settings=CLI_CONTEXT, invoke_without_command=True)
@CONNECTOR.config_option
@options_from_settings(ConnectorSettings)
@click.version_option(package_name="remotellm")
@click.pass_context
def main(ctx: click.Context, /, config_file: Path | None, **options: Any) -> None:
    """Run the RemoteLLM connector next to a local OpenAI-compatible LLM.

    It only makes outbound HTTP(S) calls to the broker: it long-polls for requests,
    forwards each to --llm-url and streams the answer back. Every option can also be set
    as REMOTELLM_<NAME> or in --config.

    `remotellm-connector check` (same options) diagnoses the way to the broker instead;
    `remotellm-connector enroll` asks a broker started with --allow-enrollment for a token.
    With no token at all, the connector enrolls first, then serves.
    """
    if ctx.invoked_subcommand is not None:
        # Options given before the subcommand apply to it too.
        CONNECTOR.remember(ctx, config_file, options)
        return
    settings = CONNECTOR.load(config_file, options)
    configure_logging(settings.log_level, settings.log_format)
    try:
        run(run_connector(settings))
    except EnrollmentRefused as exc:
        CONNECTOR.fail(str(exc))


@main.command(context_settings=CLI_CONTEXT)
@CONNECTOR.config_option
@options_from_settings(ConnectorSettings)
@click.pass_context
def check(ctx: click.Context, /, config_file: Path | None, **options: Any) -> None:
    """Diagnose the network path: proxy, DNS, TCP, TLS, token, streamed uploads, local LLM.

    Prints one line per step with a verdict and a hint; exits 1 when a step failed.
    """
    from connector.check import run_check

    settings = CONNECTOR.load_sub(ctx, config_file, options)
    # Only warnings (such as --insecure) reach stderr; the verdicts go to stdout.
    configure_logging("warning", "console")
    ok = run(run_check(settings, click.echo))
    sys.exit(0 if ok else 1)


@main.command(context_settings=CLI_CONTEXT)
@CONNECTOR.config_option
@options_from_settings(ConnectorSettings)
@click.pass_context
def enroll(ctx: click.Context, /, config_file: Path | None, **options: Any) -> None:
    """Ask the broker to let this connector join, wait for an admin's approval, keep the token.

    The request shows up on the broker's /portal/admin with this connector's name, models
    and address. Once approved, the token is saved to <data-dir>/credentials (mode 600),
    where `remotellm-connector` (run) reads it. Exits 1 when the broker refuses.
    """
    from connector.enroll import enroll as ask_to_enroll

    settings = CONNECTOR.load_sub(ctx, config_file, options)
    configure_logging(settings.log_level, settings.log_format)
    if settings.broker_token is not None:
        click.echo(
            "remotellm-connector: this connector has a token already "
            f"(given, or in {settings.credentials_path}); nothing to enroll"
        )
        return

    async def until_signal() -> str | None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await ask_to_enroll(settings, stop)

    try:
        token = run(until_signal())
    except EnrollmentRefused as exc:
        CONNECTOR.fail(str(exc))
    if token is None:
        sys.exit(130)
    click.echo(
        f"enrolled: the token is in {settings.credentials_path} (mode 600).\n"
        f"Start the connector with: remotellm-connector --broker-url {settings.broker_url}"
        + (f" --data-dir {settings.data_dir}" if settings.data_dir != default_data_dir() else "")
    )
