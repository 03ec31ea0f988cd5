"""The operator's operations, shared by the admin pages, the CLI and the admin API.

``operations.py`` is the one place a change to users, keys, limits, connectors or admin
tokens is made and audited; ``api.py`` is the admin API (``/admin/v1``) over it, with its
bodies in ``bodies.py`` and its OpenAPI document built from its route table
(``openapi.py``). docs/admin-api.md describes the design.
"""

from __future__ import annotations

from quart import Blueprint


def admin_api_blueprint() -> Blueprint:
    """The admin API (``/admin/v1``): its routes register as ``endpoints`` is imported."""
    import broker.admin.endpoints  # noqa: F401  (declaring its routes registers them)
    from broker.admin.api import bp

    return bp
