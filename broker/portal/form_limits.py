"""Bounds on what a browser may send the portal: the form's size and how slowly it comes.

Every POST under /portal/ must say its length (browsers always do for forms) and stay
within ``--portal-max-form`` bytes; its body must arrive within ``--header-timeout``
seconds (it is read before the view runs). Otherwise the answer is a page that says what
to do.
"""

from __future__ import annotations

from quart import Blueprint, Response, request
from werkzeug.exceptions import RequestTimeout

from broker.portal import pages
from broker.portal.context import portal_context
from broker.portal.security import add_security_headers
from shared.logging import get_logger

log = get_logger("broker.portal")

# No routes: app-wide hooks that apply to every POST under /portal/.
bp = Blueprint("portal_form_limits", __name__)


@bp.before_app_request
async def bound_form() -> Response | None:
    if not request.path.startswith("/portal/") or request.method in ("GET", "HEAD"):
        return None
    settings = portal_context().state.settings
    limit = settings.portal_max_form
    length = request.content_length
    if length is not None and length <= limit:
        # Read it now, whoever sends it: the view may answer before reading it.
        request.body_timeout = int(settings.header_timeout) + 1
        await request.get_data(cache=True)
        return None
    log.warning("portal_form_refused", path=request.path, length=length, limit=limit)
    if length is None:
        return _page(411, "The form did not say its size", "Send it again from the page.")
    return _page(
        413,
        f"The form is too large ({length} bytes; the limit is {limit})",
        "Shorten what you typed and send it again. If it must be this large, ask the "
        "operator to raise --portal-max-form.",
    )


@bp.app_errorhandler(RequestTimeout)
async def slow_form(exc: RequestTimeout) -> Response:
    log.warning("portal_form_timeout", path=request.path)
    return _page(408, "The form arrived too slowly", "Send it again from the page.")


def _page(status: int, what: str, todo: str) -> Response:
    response = pages.page(
        "error", status, title="This form was not accepted", what=what, todo=todo, retry=False
    )
    response.headers["Connection"] = "close"
    return add_security_headers(response)
