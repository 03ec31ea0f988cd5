"""The admin pages' side of ``broker.admin.operations``: who is acting, from where.

Every form calls an operation with the logged-in admin as the actor (``portal:<user ID>``)
and the client's address, so the pages, the CLI and the admin API make the same changes
and leave the same audit entries.
"""

from __future__ import annotations

from quart import request

from broker.accounts.users import UserEntry
from broker.admin.operations import Actor, Operations, operations_of, run
from broker.forwarded import client_address, parse_networks
from broker.portal.context import portal_context


def address() -> str | None:
    """The client's address (behind ``--trusted-proxy``, what the proxies say)."""
    settings = portal_context().state.settings
    return client_address(
        request.remote_addr,
        request.headers.get("x-forwarded-for"),
        parse_networks(settings.trusted_proxies),
    )


def actor(user_id: str) -> Actor:
    return Actor.portal(user_id, address())


def operations() -> Operations:
    return operations_of(portal_context().state)


async def own_key_changed(user: UserEntry, action: str, name: str) -> None:
    """The keys page's audit hook: a user created, regenerated or deleted their own key."""
    fresh = portal_context().users.user(user.gitlab_id)  # the key as it is now ...
    if fresh is None or fresh.key(name.strip()) is None:
        fresh = user  # ... or as it was, once deleted
    await run(operations().own_key_changed, actor(user.user_id), fresh, action, name)
