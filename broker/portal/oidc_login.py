"""OpenID Connect logins: /portal/login/<provider> and /portal/callback/<provider>.

Each provider has its own callback URL (the redirect URI registered with it), and the
flow cookie names the provider the login started with: an answer arriving on another
provider's URL is refused (the OAuth "mix-up" attack). Everything after the verified ID
token is ``login.complete_login``, as for GitLab.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quart import Response, request

from broker.accounts.identities import oidc_user_id
from broker.portal import pages
from broker.portal.common import portal_blueprint
from broker.portal.context import portal_context
from broker.portal.login import (
    LoggedIn,
    complete_login,
    failure,
    flow_of_callback,
    start_redirect,
)
from broker.portal.oauth import DENIED, STATE_MISMATCH, LoginFailed
from broker.portal.security import safe_next

if TYPE_CHECKING:  # httpx and joserfc load only with a provider configured
    from broker.portal.oidc import OidcLogin

bp = portal_blueprint("portal_oidc", __name__)


def _provider(name: str) -> OidcLogin | Response:
    found = portal_context().oidc.get(name)
    if found is None:
        return pages.page(
            "error",
            404,
            title="No such login",
            what="This broker has no login provider of that name.",
            todo="Use a login button on the portal's first page.",
            retry=True,
        )
    return found


@bp.get("/portal/login/<name>")
async def login(name: str) -> Response:
    oidc = _provider(name)
    if isinstance(oidc, Response):
        return oidc
    try:
        url, flow = await oidc.start(safe_next(request.args.get("next")))
    except LoginFailed as exc:
        return failure(exc.kind, exc.detail, oidc.provider.label)
    return start_redirect(url, flow)


@bp.get("/portal/callback/<name>")
async def callback(name: str) -> Response:
    oidc = _provider(name)
    if isinstance(oidc, Response):
        return oidc
    idp = oidc.provider.label
    flow = flow_of_callback(name, idp)
    if isinstance(flow, Response):
        return flow
    error = request.args.get("error")
    code = request.args.get("code", "")
    if error:
        return failure(DENIED, error[:64], idp)
    if not code:
        return failure(STATE_MISMATCH, "no code", idp)
    try:
        user = await oidc.finish(code, flow)
    except LoginFailed as exc:
        return failure(exc.kind, exc.detail, idp)
    who = LoggedIn(
        user_id=oidc_user_id(user.provider, user.subject),
        username=user.username,
        name=user.name,
        idp=idp,
        identity=(user.provider, user.subject),
        groups=user.groups,
    )
    return await complete_login(who, flow)
