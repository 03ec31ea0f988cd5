"""The operator's overview, connectors (live sessions, enrollment) and queues pages, and
the enrollment forms: approve, reject, revoke, set a connector's upstream LLM key."""

from __future__ import annotations

from quart import Response

from broker.admin.operations import Verdict, decide_connector, run
from broker.portal import admin_actions, admin_views
from broker.portal.admin import Admin, admin, admin_blueprint, enrolled, form_action, section
from broker.portal.context import portal_context

bp = admin_blueprint("portal_admin", __name__)
BACK = "/portal/admin/connectors"


@bp.get("/portal/admin")
@bp.get("/portal/admin/")
async def overview() -> Response:
    who = await admin()
    if isinstance(who, Response):
        return who
    portal = portal_context()
    users = portal.users.users
    view = await portal.state.relay.view()
    groups = admin_views.enrollment_groups(enrolled(portal))
    return section(
        "overview",
        who,
        users=len(users),
        blocked=sum(u.blocked for u in users),
        sessions=len(view.sessions),
        models=sorted(view.live_models),
        in_flight=view.in_flight,
        queued=sum(view.queue_depth.values()),
        pending=len(groups["pending"]),
        enrollment=portal.state.settings.allow_enrollment,
    )


@bp.get("/portal/admin/connectors")
async def connectors_page() -> Response:
    who = await admin()
    if isinstance(who, Response):
        return who
    portal = portal_context()
    state = portal.state
    entries = enrolled(portal)
    return section(
        "connectors",
        who,
        sessions=admin_views.session_rows(await state.relay.view(), state.poll_modes, entries),
        groups=admin_views.enrollment_groups(entries),
        enrollment=state.settings.allow_enrollment,
        enrolled_error=state.enrollment.error if state.enrollment else None,
    )


@bp.get("/portal/admin/queues")
async def queues_page() -> Response:
    who = await admin()
    if isinstance(who, Response):
        return who
    portal = portal_context()
    relay, settings = portal.state.relay, portal.state.settings
    names = admin_views.usernames(portal.users.users)
    return section(
        "queues",
        who,
        rows=admin_views.queue_rows(await relay.view(), await relay.waiting(), names),
        queue_max=settings.queue_max,
        queue_wait=settings.queue_wait,
    )


async def _decide(who: Admin, verdict: Verdict, form: dict[str, str]) -> None:
    state = portal_context().state
    await decide_connector(
        state, admin_actions.actor(who.user.user_id), verdict, form.get("id", "")
    )


@form_action(bp, "/portal/admin/enrollments/approve", BACK)
async def approve(who: Admin, form: dict[str, str]) -> str:
    await _decide(who, "approve", form)
    return "approved"


@form_action(bp, "/portal/admin/enrollments/reject", BACK)
async def reject(who: Admin, form: dict[str, str]) -> str:
    await _decide(who, "reject", form)
    return "rejected"


@form_action(bp, "/portal/admin/enrollments/revoke", BACK)
async def revoke(who: Admin, form: dict[str, str]) -> str:
    await _decide(who, "revoke", form)
    return "revoked"


@form_action(bp, "/portal/admin/enrollments/llm-key", BACK)
async def llm_key(who: Admin, form: dict[str, str]) -> str:
    ops, by = admin_actions.operations(), admin_actions.actor(who.user.user_id)
    await run(ops.set_llm_key, by, form.get("id", ""), form.get("llm_api_key"))
    return "llm-key"
