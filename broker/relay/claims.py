"""Which models a connector identity may serve.

Serving a model means receiving every prompt sent to it, so a token may claim only what
its operator allowed: a connectors-file entry's optional ``models:`` list (absent: any
model, as before), an enrolled connector the models it asked for when the operator
approved it. What a registration names beyond that is refused, model by model, in the
answer; the session serves the rest.
"""

from __future__ import annotations

from collections.abc import Iterable

from broker.accounts.keys import ConnectorIdentity
from shared.protocol import RefusedModel

NOT_ALLOWED = (
    "this connector token may not serve this model (the operator allows it other models: "
    "the 'models' list in the connectors file, or the models approved at enrollment)"
)


def split_claims(
    ident: ConnectorIdentity, models: Iterable[str]
) -> tuple[list[str], list[RefusedModel]]:
    """The models ``ident`` may serve of those asked for, and the refused ones with why."""
    allowed = ident.models
    granted: list[str] = []
    refused: list[RefusedModel] = []
    for model in models:
        if allowed is None or model in allowed:
            granted.append(model)
        else:
            refused.append(RefusedModel(model=model, reason=NOT_ALLOWED))
    return granted, refused
