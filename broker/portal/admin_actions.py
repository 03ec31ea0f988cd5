"""What the operator's forms do, apart from the page: each action is one function.

Kept out of the routes so the relay effects (a revoked connector's sessions end) live in
one place that tests can call too.
"""

from __future__ import annotations

import asyncio
import contextlib

from broker.accounts.enrollment import Enrolled, EnrollmentError, EnrollmentStore
from broker.broker_state import BrokerState
from broker.core import UnknownSession
from shared.logging import get_logger

log = get_logger("broker.admin")


def store_of(state: BrokerState) -> EnrollmentStore:
    if state.enrollment is None:
        raise EnrollmentError(404, "enrollment is not set up on this broker", "not_found")
    return state.enrollment


async def end_sessions(state: BrokerState, identity: str) -> int:
    """End every live session of a connector identity (its token no longer works)."""
    view = await state.relay.view()
    ids = [s.id for s in view.sessions.values() if s.owner == identity]
    for session_id in ids:
        with contextlib.suppress(UnknownSession):  # it ended meanwhile
            await state.relay.deregister(identity, session_id)
    return len(ids)


async def revoke_connector(state: BrokerState, entry_id: str, by: str) -> Enrolled:
    entry = await asyncio.to_thread(store_of(state).revoke, entry_id, by)
    ended = await end_sessions(state, entry.id)
    log.info("connector_revoked", enrollment=entry.id, connector=entry.name, sessions=ended, by=by)
    return entry
