"""``remotellm-connector``: thin click front end over ``ConnectorSettings`` and ``Connector``."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import click

from connector.settings import ConnectorSettings
from shared.errors import ConfigError
from shared.logging import configure_logging, get_logger
from shared.loop import run
from shared.settings import load_settings, options_from_settings


async def run_connector(settings: ConnectorSettings) -> None:
    from connector.health import HealthServer
    from connector.runner import Connector

    connector = Connector(settings)
    loop = asyncio.get_running_loop()
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


_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    envvar="REMOTELLM_CONFIG",
    help="YAML file with any of the settings below (keys as the option names).",
)


def _settings(config_file: Path | None, options: dict[str, Any]) -> ConnectorSettings:
    try:
        return load_settings(ConnectorSettings, config_file, options)
    except ConfigError as exc:
        click.echo(f"remotellm-connector: {exc}", err=True)
        sys.exit(2)


@click.group(context_settings=_CONTEXT, invoke_without_command=True)
@config_option
@options_from_settings(ConnectorSettings)
@click.version_option(package_name="remotellm")
@click.pass_context
def main(ctx: click.Context, /, config_file: Path | None, **options: Any) -> None:
    """Run the RemoteLLM connector next to a local OpenAI-compatible LLM.

    It only makes outbound HTTP(S) calls to the broker: it long-polls for requests,
    forwards each to --llm-url and streams the answer back. Every option can also be set
    as REMOTELLM_<NAME> or in --config.

    `remotellm-connector check` (same options) diagnoses the way to the broker instead.
    """
    if ctx.invoked_subcommand is not None:
        # Options given before the subcommand apply to it too.
        ctx.obj = {"config_file": config_file, **options}
        return
    settings = _settings(config_file, options)
    configure_logging(settings.log_level, settings.log_format)
    run(run_connector(settings))


@main.command(context_settings=_CONTEXT)
@config_option
@options_from_settings(ConnectorSettings)
@click.pass_context
def check(ctx: click.Context, /, config_file: Path | None, **options: Any) -> None:
    """Diagnose the network path: proxy, DNS, TCP, TLS, token, streamed uploads, local LLM.

    Prints one line per step with a verdict and a hint; exits 1 when a step failed.
    """
    from connector.check import run_check

    given = {k: v for k, v in (ctx.obj or {}).items() if v is not None and v != ()}
    given.update({k: v for k, v in options.items() if v is not None and v != ()})
    config = config_file or given.pop("config_file", None)
    given.pop("config_file", None)
    settings = _settings(config, given)
    # Only warnings (such as --insecure) reach stderr; the verdicts go to stdout.
    configure_logging("warning", "console")
    ok = run(run_check(settings, click.echo))
    sys.exit(0 if ok else 1)
