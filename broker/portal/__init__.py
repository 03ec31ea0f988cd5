"""The key portal at /portal/: GitLab or OpenID Connect login, personal API keys, a playground
and the team chat.

Routes are module-level functions on one blueprint per page group: ``login`` (login page,
GitLab round trip, logout), ``oidc_login`` (OpenID Connect round trips), ``keys``,
``playground`` (playground, its key, connect, static files), ``chat`` (the chat page)
and ``chat_api`` (its JSON API, with ``chat_common`` and ``chat_send``); the operator's pages in
``admin_connectors`` (overview, connectors, queues, enrollment forms), ``admin_users``
and ``admin_reports`` (usage, request log), sharing ``admin`` (admin check, CSRF, form
plumbing). Every route gets what it needs from the ``PortalContext`` (``context``) that
``broker.composition`` builds and ``install_portal`` stores on the app. Helpers:
``common`` (who is asking, checked forms), ``oauth`` (GitLab OAuth 2 + PKCE), ``oidc``
(OpenID Connect: discovery, ID token checks), ``session`` (signed cookies), ``csrf``,
``security`` (headers, ``next=``), ``form_limits``, ``pages`` (templates, examples, live
models, static files), ``usage_view``, ``admin_views``, ``admin_actions``,
``admin_usage``, ``svg_chart``. Keys live in ``broker.accounts.users``.
"""

from __future__ import annotations

from quart import Blueprint, Quart

from broker.portal import (
    admin_connectors,
    admin_reports,
    admin_users,
    chat,
    chat_api,
    form_limits,
    keys,
    login,
    oidc_login,
    playground,
)
from broker.portal.context import PortalContext, attach_context

BLUEPRINTS: tuple[Blueprint, ...] = (
    form_limits.bp,
    login.bp,
    oidc_login.bp,
    keys.bp,
    playground.bp,
    chat.bp,
    chat_api.bp,
    admin_connectors.bp,
    admin_users.bp,
    admin_reports.bp,
)


def install_portal(app: Quart, context: PortalContext) -> None:
    """Serve /portal/ with the routes' dependencies in ``context``."""
    attach_context(app, context)
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)


__all__ = ["PortalContext", "install_portal"]
