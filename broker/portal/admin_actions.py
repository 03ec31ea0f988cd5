"""What the operator's forms do, apart from the page: each action is one function.

Kept out of the routes so the relay effects (a revoked connector's sessions end) live in
one place that tests can call too.
"""

from __future__ import annotations

import asyncio

from broker.enrollment import Enrolled, EnrollmentError, EnrollmentStore
from broker.state import BrokerState
from shared.logging import get_logger

log = get_logger("broker.admin")


def store_of(state: BrokerState) -> EnrollmentStore:
    if state.enrollment is None:
        raise EnrollmentError(404, "enrollment is not set up on this broker", "not_found")
    return state.enrollment


def end_sessions(state: BrokerState, identity: str) -> int:
    """End every live session of a connector identity (its token no longer works)."""
    core = state.hub.core
    ids = [s.id for s in core.sessions.values() if s.owner == identity]
    for session_id in ids:
        core.deregister(identity, session_id, state.hub.clock())
    return len(ids)


async def revoke_connector(state: BrokerState, entry_id: str, by: str) -> Enrolled:
    entry = await asyncio.to_thread(store_of(state).revoke, entry_id, by)
    ended = end_sessions(state, entry.id)
    log.info("connector_revoked", enrollment=entry.id, connector=entry.name, sessions=ended, by=by)
    return entry
