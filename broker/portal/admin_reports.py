"""The operator's usage page and request log (what they show: ``admin_usage``)."""

from __future__ import annotations

from quart import Response, request

from broker.portal import admin_usage
from broker.portal.admin import Refused, admin, admin_blueprint, refused, section
from broker.portal.context import portal_context

bp = admin_blueprint("portal_admin_reports", __name__)

USAGE_TODO = "Pick 1d, 7d or 30d, or give dates as YYYY-MM-DD with from before to."
LOG_TODO = "Clear the filter, or give a status as a number such as 200 or 429."


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
