"""A request that names an alias: submitted for its first target a live connector takes.

Each target is tried in order with the body's ``model`` rewritten to the target's real
name (``broker.core.request_body.with_model``) and the relay route of the target (a pinned
target's route reaches only sessions of that connector name, ``broker.core.aliases``). A
target is passed over when the relay refuses it (no session serves it, none is online, or
its queue is full): that happens before the request is queued, so before any byte of an
answer exists. Once a target took the request it is never moved to another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from broker.api.input import ApiError
from broker.core import NoConnector, Pending, QueueFull, UnknownModel
from broker.core.aliases import Alias, Target
from broker.core.request_body import with_model
from broker.state.relay import RelayState, ResponseSource
from shared.model_names import shown
from shared.protocol import REQUEST_ID_HEADER, RequestItem

SERVED_MODEL_HEADER = "x-remotellm-served-model"
_PASSED_OVER = (UnknownModel, NoConnector, QueueFull)


@dataclass(frozen=True, slots=True)
class Resolved:
    """What an alias request was submitted as."""

    alias: str
    target: Target
    pending: Pending
    channel: ResponseSource


async def submit_alias(
    hub: RelayState, item: RequestItem, alias: Alias, user: str, body_limit: int
) -> Resolved:
    """Submit ``item`` (which names ``alias``) for the first target the relay accepts."""
    full: QueueFull | None = None
    for target in alias.targets:
        body = with_model(item.body, target.model)
        if len(body) > body_limit:  # the rewrite is the body the upstream receives
            raise ApiError(
                413,
                f"request body exceeds {body_limit} bytes once the model is named",
                "request_too_large",
                headers={REQUEST_ID_HEADER: item.request_id},
            )
        routed = item.model_copy(update={"model": target.route, "body": body})
        try:
            pending, channel = await hub.submit(routed, user=user)
        except _PASSED_OVER as exc:
            if isinstance(exc, QueueFull):
                full = exc
            continue
        return Resolved(alias.name, target, pending, channel)
    if full is not None:
        raise full
    tried = ", ".join(t.shown() for t in alias.targets)
    raise NoConnector(
        f"no connector serving a target of the alias {shown(alias.name)} is online "
        f"(tried in order: {tried})"
    )


def alias_fields(alias: Alias, live: Mapping[str, Sequence[str]]) -> dict[str, object]:
    """What ``/v1/models`` adds to an alias's entry: its targets and the one serving now."""
    now = alias.serving_now(live)
    return {
        "connectors": 0 if now is None else _serving(now, live),
        "alias_for": [_target_json(t) for t in alias.targets],
        "served_by": None if now is None else _target_json(now),
    }


def _serving(target: Target, live: Mapping[str, Sequence[str]]) -> int:
    return 1 if target.connector is not None else len(live.get(target.model, ()))


def _target_json(target: Target) -> dict[str, str | None]:
    return {"model": target.model, "connector": target.connector}
