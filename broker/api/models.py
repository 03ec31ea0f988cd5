"""The OpenAI API's routes that Quart serves: the model list, and 405 for wrong methods.

``POST /v1/*`` (the relayed requests) is plain ASGI in ``broker.api.relay``.
"""

from __future__ import annotations

import json
from typing import Any

from quart import Blueprint, Response, request

from broker.accounts.keys import UserKey
from broker.api.aliasing import alias_fields
from broker.api.input import (
    CLIENT_REQUEST_ID_HEADER,
    ApiError,
    allowed_models,
    authenticate,
    authorize_model,
    client_label,
    new_request_id,
)
from broker.broker_state import BrokerState
from broker.core.errors import BrokerError
from broker.core.route_shapes import shape_for
from broker.errors import error_response
from shared.errors import quote
from shared.protocol import REQUEST_ID_HEADER


def _json(body: object, rid: str) -> Response:
    response = Response(json.dumps(body), content_type="application/json")
    response.headers[REQUEST_ID_HEADER] = rid
    return response


def create_api_blueprint(state: BrokerState) -> Blueprint:
    bp = Blueprint("api", __name__)
    hub = state.relay

    def model_entry(model: str, owners: list[str]) -> dict[str, Any]:
        return {
            "id": model,
            "object": "model",
            "created": int(state.started),
            "owned_by": "remotellm",
            "connectors": len(owners),
        }

    @bp.errorhandler(BrokerError)
    async def api_error(exc: BrokerError) -> Response:
        # StateUnavailable too: 503 with Retry-After; in the shape of the route asked for.
        return error_response(exc, shape=shape_for(request.path))

    @bp.after_request
    async def echo_label(response: Response) -> Response:
        label = client_label(request.headers.get(REQUEST_ID_HEADER))
        if label is not None:
            response.headers[CLIENT_REQUEST_ID_HEADER] = label
        return response

    def checked() -> tuple[str, UserKey]:
        rid = new_request_id()
        headers = request.headers
        user = authenticate(state.keys, headers.get("Authorization"), rid, headers.get("x-api-key"))
        return rid, user

    def alias_entry(name: str, live: dict[str, list[str]]) -> dict[str, Any] | None:
        alias = state.aliases.get(name)
        if alias is None:
            return None
        return model_entry(name, []) | alias_fields(alias, live)

    @bp.get("/v1/models")
    async def list_models() -> Response:
        rid, user = checked()
        live = (await hub.view()).live_models
        # An alias shadows a served model of its name (docs/aliases.md): listed once, as it.
        # A scoped key sees only what it may use.
        names = allowed_models(user, sorted(set(live) | set(state.aliases.aliases)))
        data = [alias_entry(m, live) or model_entry(m, live[m]) for m in names]
        return _json({"object": "list", "data": data}, rid)

    @bp.get("/v1/models/<path:model_id>")
    async def get_model(model_id: str) -> Response:
        rid, user = checked()
        authorize_model(user, model_id, rid)
        live = (await hub.view()).live_models
        entry = alias_entry(model_id, live)
        if entry is not None:
            return _json(entry, rid)
        owners = live.get(model_id)
        if owners is None:
            raise ApiError(
                404,
                f"The model '{quote(model_id)}' does not exist",
                "model_not_found",
                type_="invalid_request_error",
                param="model",
                headers={REQUEST_ID_HEADER: rid},
            )
        return _json(model_entry(model_id, owners), rid)

    @bp.route("/v1/<path:rest>", methods=["GET", "PUT", "PATCH", "DELETE"])
    async def other(rest: str) -> Response:
        """Every /v1 path but the model list is relayed by POST: other methods get 405."""
        rid, _ = checked()
        raise ApiError(
            405,
            f"Method {request.method} is not allowed on /v1/{quote(rest)}; use POST",
            "method_not_allowed",
            headers={REQUEST_ID_HEADER: rid, "Allow": "POST"},
        )

    return bp
