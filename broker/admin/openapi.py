"""The admin API's OpenAPI 3.1 document, built from its one route table (``api.ROUTES``)
and the pydantic models of its bodies, so the document lists exactly the routes served
(``tests/unit/broker/admin/test_openapi.py`` checks both ways against Quart's rules)."""

from __future__ import annotations

import re
from typing import Any

from broker.admin.api import PREFIX, ROUTES, Route

_PARAM = re.compile(r"\{(\w+)\}")

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _responses(item: Route) -> dict[str, Any]:
    def error(text: str) -> dict[str, Any]:
        ref = {"$ref": "#/components/schemas/Error"}
        return {"description": text, "content": {"application/json": {"schema": ref}}}

    responses: dict[str, Any] = {
        "200": {
            "description": "OK",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    }
    if item.scope is not None:
        responses["400"] = error("Invalid input (the message names the field)")
        responses["401"] = error("No admin token, or an unknown or revoked one")
        responses["404"] = error("No such user, key or enrollment")
    if item.scope == "write":
        responses["403"] = error("The admin token is read-only")
        responses["413"] = error("The body is too large")
    return responses


def _operation(item: Route) -> dict[str, Any]:
    params = [
        {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
        for n in _PARAM.findall(item.path)
    ]
    params += [
        {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
        for n in item.query
    ]
    op: dict[str, Any] = {
        "operationId": item.method.lower() + re.sub(r"\W+", "_", item.path).rstrip("_"),
        "summary": item.summary,
        "responses": _responses(item),
        "x-scope": item.scope or "none",
    }
    if params:
        op["parameters"] = params
    if item.scope is not None:
        op["security"] = [{"adminToken": []}]
    if item.body is not None:
        ref = {"$ref": f"#/components/schemas/{item.body.__name__}"}
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}
    return op


def document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {"Error": _ERROR}
    for item in ROUTES:
        paths.setdefault(PREFIX + item.path, {})[item.method.lower()] = _operation(item)
        if item.body is not None:
            schemas[item.body.__name__] = item.body.model_json_schema()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "RemoteLLM broker admin API",
            "version": "1",
            "description": "Operator actions and reports; docs/admin-api.md. Bearer admin "
            "tokens from `remotellm-broker admin-tokens create`; read or write scope.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}},
        },
    }
