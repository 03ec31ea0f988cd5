"""The key portal at /portal/: GitLab login, personal API keys, a playground.

``install_portal(app, state)`` is all ``create_app`` calls. Modules:
``oauth`` (GitLab OAuth 2 + PKCE), ``session`` (signed cookies), ``csrf``, ``security``
(headers, ``next=``), ``pages`` (templates, examples, live models, static files),
``usage_view`` (a user's usage), ``routes`` (the blueprint); the operator's pages in
``admin`` (routes), ``admin_views`` (rows), ``admin_actions`` (what forms do) and
``svg_chart``. Keys live in ``broker.accounts.users``.
"""

from __future__ import annotations

from quart import Quart

from broker.broker_state import BrokerState
from broker.portal.admin import create_admin_blueprint
from broker.portal.routes import build_portal, create_portal_blueprint


def install_portal(app: Quart, state: BrokerState) -> None:
    """Serve /portal/ and let the users file's keys authenticate the API."""
    portal = build_portal(state)
    app.register_blueprint(create_portal_blueprint(portal))
    app.register_blueprint(create_admin_blueprint(portal))


__all__ = ["install_portal"]
