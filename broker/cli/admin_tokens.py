"""``remotellm-broker admin-tokens create|list|revoke``: the admin API's bearer tokens.

``create`` prints the secret once (only its hash is kept, in ``<data-dir>/admin_tokens.yaml``);
the running broker accepts it at the next request. Creating and revoking are audited with
the operating system user as the actor (``cli:<user>``).
"""

from __future__ import annotations

import click

from broker.accounts.admin_tokens import SCOPES, AdminTokenRefused, Scope
from broker.accounts.store import FileBroken
from broker.accounts.users import UsersStore
from broker.admin.operations import Actor, Operations, build_operations
from broker.cli.program import BROKER


def _ops(ctx: click.Context) -> Operations:
    settings = BROKER.load_sub(ctx)
    users = UsersStore(settings.users_path)
    return build_operations(users, None, settings.usage_path, settings.admin_tokens_path)


@click.group("admin-tokens")
def admin_tokens_command() -> None:
    """Create, list and revoke the admin API's tokens (docs/admin-api.md)."""


@admin_tokens_command.command("create")
@click.option("--scope", type=click.Choice(SCOPES), required=True, help="read, or write too.")
@click.option("--label", default="", help="What the token is for (shown in lists and audit).")
@click.pass_context
def create(ctx: click.Context, scope: Scope, label: str) -> None:
    """Create a token and print its secret: it is shown this once."""
    ops = _ops(ctx)
    try:
        secret, token = ops.create_admin_token(Actor.cli(), scope, label)
    except (AdminTokenRefused, FileBroken) as exc:
        BROKER.fail(str(exc))
    click.echo(f"created admin token {token.id} ({token.scope}); its secret, shown once:")
    click.echo(secret)


@admin_tokens_command.command("list")
@click.pass_context
def list_tokens(ctx: click.Context) -> None:
    """Every token: ID, scope, label, prefix, created, by whom, revoked."""
    rows = [("ID", "SCOPE", "LABEL", "PREFIX", "CREATED", "BY", "REVOKED")]
    for t in _ops(ctx).tokens.tokens:
        revoked = t.revoked.strftime("%Y-%m-%d %H:%M") if t.revoked else "-"
        created = t.created.strftime("%Y-%m-%d %H:%M")
        rows.append((t.id, t.scope, t.label or "-", t.prefix + "…", created, t.created_by, revoked))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@admin_tokens_command.command("revoke")
@click.argument("token_id")
@click.pass_context
def revoke(ctx: click.Context, token_id: str) -> None:
    """Revoke the token TOKEN_ID (at-...): it stops working at its next request."""
    try:
        token = _ops(ctx).revoke_admin_token(Actor.cli(), token_id)
    except (AdminTokenRefused, FileBroken) as exc:
        BROKER.fail(str(exc))
    click.echo(f"revoked admin token {token.id}")


__all__ = ["admin_tokens_command"]
