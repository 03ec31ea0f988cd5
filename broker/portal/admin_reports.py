"""The operator's usage page, request log (what they show: ``admin_usage``) and audit trail."""

from __future__ import annotations

import asyncio
import json

from quart import Response, request

from broker.portal import admin_usage
from broker.portal.admin import Refused, admin, admin_blueprint, refused, section
from broker.portal.context import portal_context
from broker.usage.audit import AuditEntry, AuditFilter, entries
from broker.usage.query import LedgerError, LedgerMissing

bp = admin_blueprint("portal_admin_reports", __name__)

USAGE_TODO = "Pick 1d, 7d or 30d, or give dates as YYYY-MM-DD with from before to."
LOG_TODO = "Clear the filter, or give a status as a number such as 200 or 429."
AUDIT_PAGE = 50
MAX_PAGE = 100_000


@bp.get("/portal/admin/usage")
async def usage_page() -> Response:
    who = await admin()
    if isinstance(who, Response):
        return who
    portal = portal_context()
    try:
        view = await admin_usage.usage_view(portal.state, portal.users, request.args)
    except admin_usage.BadQuery as exc:
        return refused(who, Refused(400, "That period cannot be shown", str(exc), USAGE_TODO))
    return section("usage", who, view=view)


@bp.get("/portal/admin/requests")
async def requests_page() -> Response:
    who = await admin()
    if isinstance(who, Response):
        return who
    portal = portal_context()
    try:
        view = await admin_usage.request_log(portal.state, portal.users, request.args)
    except admin_usage.BadQuery as exc:
        return refused(who, Refused(400, "That filter cannot be used", str(exc), LOG_TODO))
    return section("requests", who, view=view)


def _page_number() -> int | None:
    text = request.args.get("page", "1")
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE:
        return None
    return int(text)


async def _audit_rows(page: int) -> tuple[list[AuditEntry], str]:
    """One page of the audit trail, newest first (one extra row says there is more)."""
    db = portal_context().state.settings.usage_path
    offset = (page - 1) * AUDIT_PAGE
    try:
        rows = await asyncio.to_thread(
            entries, db, AuditFilter(), newest_first=True, limit=AUDIT_PAGE + 1, offset=offset
        )
    except LedgerMissing:
        return [], ""
    except LedgerError as exc:
        return [], str(exc)
    return rows, ""


@bp.get("/portal/admin/audit")
async def audit_page() -> Response:
    who = await admin()
    if isinstance(who, Response):
        return who
    page = _page_number()
    if page is None:
        what = f"page must be a whole number from 1 to {MAX_PAGE}"
        return refused(who, Refused(400, "That page does not exist", what, "Go to page 1."))
    rows, note = await _audit_rows(page)
    shown = [(e, json.dumps(e.details, sort_keys=True) if e.details else "") for e in rows]
    return section(
        "audit", who, rows=shown[:AUDIT_PAGE], page=page, more=len(rows) > AUDIT_PAGE, note=note
    )
