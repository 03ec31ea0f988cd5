"""``POST /relay/v1/enroll``: what the relay answers a connector that has no token yet.

The relay app calls ``answer`` from its one route entry and converts ``EnrollmentError``
into its ``RelayError``; the store (``broker.accounts.enrollment``) decides. The connector's
address is the one the broker sees, through trusted proxies only (``broker.forwarded``).
"""

from __future__ import annotations

import asyncio

from broker.accounts.enrollment import EnrollmentError
from broker.asgi import Scope
from broker.broker_state import BrokerState
from broker.forwarded import client_address, parse_networks
from shared.protocol import EnrollRequest

DISABLED = (
    "this broker does not take enrollment requests: ask its operator for a connector token "
    "(REMOTELLM_BROKER_TOKEN or --broker-token-file), or to start the broker with "
    "--allow-enrollment"
)


def address_of(scope: Scope, state: BrokerState) -> str | None:
    client = scope.get("client")
    forwarded = next(
        (v.decode("latin-1") for k, v in scope["headers"] if k == b"x-forwarded-for"), None
    )
    trusted = parse_networks(state.settings.trusted_proxies)
    return client_address(client[0] if client else None, forwarded, trusted)


def check_enabled(state: BrokerState) -> None:
    """Before the body is read: without --allow-enrollment nothing is looked at or stored."""
    if not state.settings.allow_enrollment or state.enrollment is None:
        raise EnrollmentError(401, DISABLED, "enrollment_disabled", type_="authentication_error")


async def answer(state: BrokerState, req: EnrollRequest, scope: Scope) -> tuple[int, bytes]:
    check_enabled(state)
    assert state.enrollment is not None
    verdict = await asyncio.to_thread(state.enrollment.ask, req, address_of(scope, state))
    return verdict.status, verdict.reply.model_dump_json().encode()
