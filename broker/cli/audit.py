"""``remotellm-broker audit``: the audit trail (who changed what, when, from where).

Reads the ``audit`` table of the usage database the broker writes (the same settings find
it: ``<data-dir>/usage.sqlite3`` or ``--usage-db``), read-only; ``--db`` repeatable merges
several brokers' databases in time order, like ``remotellm-broker usage``.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import click

from broker.cli.program import BROKER
from broker.cli.usage import FORMATS, db_option, period_options
from broker.usage.audit import AuditEntry, AuditFilter, merged_entries
from broker.usage.query import LedgerError

COLUMNS = ("time", "actor", "address", "action", "target", "details")


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cells(entry: AuditEntry) -> list[str]:
    details = json.dumps(entry.details, sort_keys=True) if entry.details else ""
    return [_when(entry.ts), entry.actor, entry.address or "-", entry.action, entry.target, details]


def render_table(found: list[AuditEntry]) -> str:
    rows = [[c.upper() for c in COLUMNS], *(_cells(e) for e in found)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = [
        "  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)), r[-1]]).rstrip()
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def render_csv(found: list[AuditEntry]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for entry in found:
        writer.writerow(_cells(entry))
    return out.getvalue()


def render_json(found: list[AuditEntry]) -> str:
    return json.dumps({"entries": [e.as_json() for e in found]}, indent=2) + "\n"


@click.command("audit")
@period_options
@click.option("--actor", default=None, help="One actor, e.g. cli:alice or admin-token:at-1a2b3c4d.")
@click.option("--action", default=None, help="One action, e.g. user.block or key.revoke.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@db_option("their entries are merged in time order")
@click.pass_context
def audit_command(
    ctx: click.Context,
    since: float | None,
    until: float | None,
    actor: str | None,
    action: str | None,
    fmt: str,
    dbs: tuple[Path, ...],
) -> None:
    """The audit trail, oldest first: keys created, regenerated, revoked; users blocked;
    limits changed; connectors approved, rejected, revoked; admin tokens created.

    Examples: `remotellm-broker audit --since 7d`, `remotellm-broker audit --format csv`,
    `remotellm-broker audit --db a/usage.sqlite3 --db b/usage.sqlite3` (several brokers).
    """
    if since is not None and until is not None and until <= since:
        BROKER.fail("--until must be later than --since", 2)
    paths = list(dbs) or [BROKER.load_sub(ctx).usage_path]
    filt = AuditFilter(since=since, until=until, actor=actor, action=action)
    try:
        found = merged_entries(paths, filt)
    except LedgerError as exc:
        BROKER.fail(str(exc))
    render = {"json": render_json, "csv": render_csv}.get(fmt, render_table)
    click.echo(render(found), nl=False)


__all__ = ["audit_command"]
