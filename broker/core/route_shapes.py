"""The one place that says which shape a relayed route's answers take.

A path under a prefix below gets that shape (Anthropic's for ``/v1/messages*``, Ollama's
for its native ``/api/*``); every other path gets OpenAI's. The prefix
matches the path itself or the path followed by ``/`` (``/v1/messages`` and
``/v1/messages/count_tokens``, not ``/v1/messagesx``). The path may be anything a client
sent (the check for canonical paths comes after): a shape only chooses how errors look.
"""

from __future__ import annotations

from broker.core.anthropic import ANTHROPIC
from broker.core.ollama import OLLAMA
from broker.core.shape import OPENAI, RouteShape

__all__ = ["ROUTE_SHAPES", "shape_for"]

# (path prefix, shape); the first match wins.
ROUTE_SHAPES: tuple[tuple[str, RouteShape], ...] = (("/v1/messages", ANTHROPIC), ("/api", OLLAMA))


def shape_for(path: str) -> RouteShape:
    """The shape of the route ``path`` (as sent, undecoded, without the query)."""
    for prefix, shape in ROUTE_SHAPES:
        if path == prefix or path.startswith(prefix + "/"):
            return shape
    return OPENAI
