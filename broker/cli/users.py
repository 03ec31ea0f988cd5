"""``remotellm-broker users list|keys|block|unblock|revoke|limits|scope|key-defaults``: the
users file for operators.

The commands read the same settings as the broker (``--config``, env, the group's flags),
so they edit the very file the running broker serves; it picks the change up within
seconds, and a blocked user's keys stop working then.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import click

from broker.accounts.key_scope import ScopeAsk
from broker.accounts.users import (
    KeyActionRefused,
    KeyEntry,
    LimitsEntry,
    UsersFileError,
    UsersStore,
)
from broker.admin.operations import Actor, Operations, build_operations
from broker.cli.program import BROKER
from broker.core.limits import LIMIT_FIELDS, UNLIMITED, Override


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "-"


def _store(ctx: click.Context) -> UsersStore:
    settings = BROKER.load_sub(ctx)
    store = UsersStore(settings.users_path, max_key_lifetime=settings.max_key_lifetime)
    if store.error:
        BROKER.fail(store.error)
    return store


def _ops(ctx: click.Context) -> tuple[Operations, Actor]:
    """The users file's operations (audited in this broker's usage database) and the actor."""
    settings = BROKER.load_sub(ctx)
    ops = build_operations(_store(ctx), None, settings.usage_path, settings.admin_tokens_path)
    return ops, Actor.cli()


def _run(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except (KeyActionRefused, UsersFileError) as exc:
        BROKER.fail(str(exc))


@click.group("users")
def users_command() -> None:
    """List the key portal's users, block or unblock them, list or revoke their keys, and
    show or set their limits."""


@users_command.command("list")
@click.pass_context
def list_users(ctx: click.Context) -> None:
    """Every user: GitLab id, username, blocked, number of keys, last login, limits."""
    store = _store(ctx)
    rows = [("ID", "USERNAME", "BLOCKED", "KEYS", "LAST LOGIN", "LIMITS")]
    for u in store.users:
        rows.append(
            (
                str(u.gitlab_id),
                u.username,
                "yes" if u.blocked else "no",
                str(len(u.keys)),
                _when(u.last_login),
                _limits_text(u.limits),
            )
        )
    _table(rows)
    click.echo(f"{len(store.users)} users in {store.path}")


@users_command.command("keys")
@click.argument("user")
@click.pass_context
def list_keys(ctx: click.Context, user: str) -> None:
    """The keys of USER (username or GitLab id): name, prefix, created, last used, the
    models each may use, its expiry ("expired" once past: kept until revoked) and label."""
    store = _store(ctx)
    entry = next((u for u in store.users if user in (u.username, str(u.gitlab_id))), None)
    if entry is None:
        click.echo(f"remotellm-broker: no user {user!r} in {store.path}", err=True)
        sys.exit(1)
    rows = [("NAME", "PREFIX", "CREATED", "LAST USED", "MODELS", "EXPIRES", "LABEL")]
    now = time.time()
    for k in entry.keys:
        rows.append(
            (
                k.name,
                k.prefix + "…",
                _when(k.created),
                _when(k.last_used),
                ",".join(k.models) if k.models is not None else "all",
                _expiry(k, now),
                k.label or "-",
            )
        )
    _table(rows)


def _expiry(key: KeyEntry, now: float) -> str:
    if key.expires is None:
        return "never"
    return ("expired " if key.is_expired(now) else "") + _when(key.expires)


@users_command.command("scope")
@click.argument("user")
@click.argument("key")
@click.option(
    "--models",
    default=None,
    help="Models and aliases KEY may use, comma-separated ('*': every model).",
)
@click.option(
    "--expires",
    default=None,
    help="When KEY stops working: a lifetime from now "
    "(90m, 12h, 30d, 2w), a UTC date (2027-01-31[T18:00]) or 'never'.",
)
@click.option("--label", default=None, help="A note shown with the key ('' removes it).")
@click.pass_context
def scope(
    ctx: click.Context,
    user: str,
    key: str,
    models: str | None,
    expires: str | None,
    label: str | None,
) -> None:
    """Set the models, expiry or label of USER's key KEY (its name or prefix). Options not
    given stay as they are; operators are not bound by --max-key-lifetime or group
    defaults. The running brokers apply it within seconds."""
    ops, by = _ops(ctx)
    ask = ScopeAsk(models=models, expiry=expires, label=label)
    entry = _run(lambda: ops.set_scope(by, user, key.rstrip("…"), ask))
    shown = ",".join(entry.models) if entry.models is not None else "all"
    click.echo(
        f"{user}'s key {entry.name} ({entry.prefix}…): models {shown}, "
        f"expires {_expiry(entry, time.time())}, label {entry.label or '-'}"
    )


@users_command.command("key-defaults")
@click.argument("group", required=False)
@click.option(
    "--models",
    default=None,
    help="Models and aliases the group's members' keys may use, comma-separated (default: any).",
)
@click.option(
    "--lifetime",
    default=None,
    help="Default lifetime of their new keys (90m, 12h, 30d, 2w; default: no expiry).",
)
@click.option("--remove", is_flag=True, help="Remove GROUP's defaults.")
@click.pass_context
def key_defaults(
    ctx: click.Context, group: str | None, models: str | None, lifetime: str | None, remove: bool
) -> None:
    """List the key defaults per GitLab group, or set (or --remove) GROUP's.

    A member of a group with defaults may give their keys only the models of their groups,
    and new keys get the shortest lifetime of their groups. Groups are read at login with
    --gitlab-allowed-group."""
    ops, by = _ops(ctx)
    if group is not None:
        _run(lambda: ops.set_group_defaults(by, group, models, lifetime, remove=remove))
    store = ops.users
    store.reload()
    rows = [("GROUP", "MODELS", "LIFETIME")]
    for d in store.key_defaults:
        rows.append((d.group, ",".join(d.models) if d.models else "any", d.lifetime or "none"))
    _table(rows)


@users_command.command("block")
@click.argument("user")
@click.pass_context
def block(ctx: click.Context, user: str) -> None:
    """Block USER: the portal shows them a blocked page and their keys stop working."""
    ops, by = _ops(ctx)
    entry = _run(lambda: ops.set_blocked(by, user, True))
    click.echo(f"blocked {entry.username} (GitLab id {entry.gitlab_id})")


@users_command.command("unblock")
@click.argument("user")
@click.pass_context
def unblock(ctx: click.Context, user: str) -> None:
    """Unblock USER: their keys work again."""
    ops, by = _ops(ctx)
    entry = _run(lambda: ops.set_blocked(by, user, False))
    click.echo(f"unblocked {entry.username} (GitLab id {entry.gitlab_id})")


@users_command.command("revoke")
@click.argument("user")
@click.argument("key")
@click.pass_context
def revoke(ctx: click.Context, user: str, key: str) -> None:
    """Delete USER's key named KEY (its name or its prefix, e.g. sk-1a2b3c)."""
    ops, by = _ops(ctx)
    entry = _run(lambda: ops.revoke_key(by, user, key.rstrip("…")))
    click.echo(f"revoked {user}'s key {entry.name} ({entry.prefix}…)")


_LIMIT_OPTIONS = {
    "rpm": "rpm",
    "tpm": "tpm",
    "concurrency": "concurrency",
    "daily_tokens": "daily-tokens",
    "monthly_tokens": "monthly-tokens",
}
_LIMIT_HELP = "a number, 'unlimited', or 'default' (as the broker's settings say)"


def _limit_value(text: str) -> Override:
    text = text.strip().lower()
    if text == "default":
        return None
    if text == UNLIMITED:
        return UNLIMITED
    if not text.isdigit() or int(text) < 1:
        raise click.BadParameter(f"{text!r} is not {_LIMIT_HELP}")
    return int(text)


def _limits_text(entry: LimitsEntry | None) -> str:
    if entry is None:
        return "defaults"
    shown = [f"{_LIMIT_OPTIONS[n]}={getattr(entry, n)}" for n in LIMIT_FIELDS if getattr(entry, n)]
    return " ".join(shown) or "defaults"


def _limit_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for name in reversed(LIMIT_FIELDS):
        flag = "--" + _LIMIT_OPTIONS[name]
        func = click.option(flag, name, default=None, metavar="N", help=_LIMIT_HELP)(func)
    return func


@users_command.command("limits")
@click.argument("user")
@click.option("--key", default=None, help="Set the limits of this key (name or prefix) alone.")
@click.option("--clear", is_flag=True, help="Remove every override of USER (or of --key) first.")
@_limit_options
@click.pass_context
def limits(
    ctx: click.Context, /, user: str, key: str | None, clear: bool, **given: str | None
) -> None:
    """Show or change the limit overrides of USER (or of one of their keys).

    With no option, prints the overrides of USER and of each key. A user's overrides
    replace the broker's --rpm-limit etc. for them; a key's limits apply to that key on
    top of its user's. The running broker applies a change within seconds.
    """
    ops, by = _ops(ctx)
    store = ops.users
    values = {n: _limit_value(v) for n, v in given.items() if v is not None}
    if values or clear:
        _run(lambda: ops.set_limits(by, user, values, key=key, replace=clear))
    entry = next((u for u in store.users if user in (u.username, str(u.gitlab_id))), None)
    if entry is None:
        click.echo(f"remotellm-broker: no user {user!r} in {store.path}", err=True)
        sys.exit(1)
    click.echo(f"{entry.username}: {_limits_text(entry.limits)}")
    for k in entry.keys:
        click.echo(f"  key {k.name} ({k.prefix}…): {_limits_text(k.limits)}")


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


__all__ = ["users_command"]
