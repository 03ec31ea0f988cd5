"""The OpenAPI document and the routes the broker serves under /admin/v1 match both ways."""

from __future__ import annotations

import re

from broker.admin import admin_api_blueprint
from broker.admin.api import PREFIX
from broker.admin.openapi import document
from broker.composition import create_app
from broker.settings import BrokerSettings


def _served(tmp_path_factory_dir: str) -> set[tuple[str, str]]:
    settings = BrokerSettings(data_dir=tmp_path_factory_dir, generate_credentials=False)
    app = create_app(settings)
    served = set()
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(PREFIX):
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                served.add((method.lower(), path))
    return served


def test_every_route_is_documented_and_every_documented_route_is_served(tmp_path) -> None:  # type: ignore[no-untyped-def]
    admin_api_blueprint()
    served = _served(str(tmp_path))
    documented = {(m, p) for p, ops in document()["paths"].items() for m in ops}
    assert served == documented
    assert len(served) >= 17


def test_every_operation_says_its_scope_and_write_routes_refuse_read_tokens() -> None:
    for path, ops in document()["paths"].items():
        for method, op in ops.items():
            scope = op["x-scope"]
            assert scope in ("read", "write", "none"), path
            assert (method == "get") == (scope != "write"), (method, path)
            if scope == "write":
                assert "403" in op["responses"]
            if scope != "none":
                assert op["security"] == [{"adminToken": []}]


def test_bodies_are_described_by_their_models() -> None:
    doc = document()
    schemas = doc["components"]["schemas"]
    put = doc["paths"]["/admin/v1/users/{user}/limits"]["put"]
    ref = put["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/LimitsBody"
    assert schemas["LimitsBody"]["additionalProperties"] is False
