"""The one rule for the paths a relayed request may take: canonical ``/v1/...`` routes,
and the few routes of Ollama's native API under ``/api/``.

The broker checks the path an API user sent (``relayed_path``: canonical, then on the
route allowlist; ``ollama_route`` for ``/api/...``) before it reads the body; the
connector checks the path a broker handed it (``relay_target``: canonical, and an
``/api/`` path only on Ollama's allowlist and only when its engine is Ollama) before it
calls the local LLM. Canonical means what the local LLM
receives is exactly what was checked: no ``.`` or ``..`` segment, no empty segment, no
percent-encoding (so no encoded ``/``, ``?``, ``#`` or dot), no ``\\``, no query.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

API_PREFIX = "/v1/"
OLLAMA_PREFIX = "/api/"
MAX_PATH_CHARS = 256
ANY_SEGMENT = "*"  # in a route pattern: exactly one segment, e.g. responses/*/cancel

# The POST routes of the OpenAI API that local engines (llama.cpp's server, vLLM, Ollama,
# LM Studio, llama-cpp-python, LocalAI, TGI) serve under /v1, relative to /v1/.
STANDARD_ROUTES: tuple[str, ...] = (
    "chat/completions",
    "completions",
    "embeddings",
    "responses",
    "responses/*/cancel",
    "moderations",
    "rerank",
    "reranking",
    "score",
    "messages",
    "messages/count_tokens",
    "audio/speech",
    "audio/transcriptions",
    "audio/translations",
    "images/generations",
    "images/edits",
    "images/variations",
)

# Ollama's native API (docs/clients.md), relative to /api/. Relayed (POST) to connectors
# whose engine is Ollama:
OLLAMA_RELAYED: frozenset[str] = frozenset({"chat", "generate", "embed", "embeddings", "show"})
# Answered by the broker itself from the live connectors (GET):
OLLAMA_LOCAL: frozenset[str] = frozenset({"tags", "ps", "version"})
# They change the engine (download, create, copy, delete, upload models): never relayed, by
# first segment (``blobs/<digest>``).
OLLAMA_REFUSED: frozenset[str] = frozenset({"pull", "create", "copy", "delete", "push", "blobs"})
OLLAMA_ENGINE = "ollama"  # the engine kind a connector reports for an Ollama server

# RFC 3986 unreserved characters, plus ':' and '@' (ids such as "ft:model@v2").
_SEGMENT = re.compile(r"[A-Za-z0-9._~:@-]+")


class PathRefused(ValueError):
    """A path that is not relayed: ``status`` 400 (not canonical) or 404 (not a route)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _segment_fault(segment: str) -> str | None:
    if not segment:
        return "an empty segment ('//' or a trailing '/')"
    if segment in (".", ".."):
        return f"a '{segment}' segment"
    if "%" in segment:
        return "percent-encoding"
    if not _SEGMENT.fullmatch(segment):
        return "a character outside A-Z a-z 0-9 . _ ~ : @ -"
    return None


def canonical_path(path: str, prefix: str = API_PREFIX) -> str:
    """``path`` itself when it is a canonical path under ``prefix`` (``/v1/`` unless told),
    else ``PathRefused`` (400).

    ``path`` is the request target's path as sent (undecoded), without the query.
    """
    if len(path) > MAX_PATH_CHARS:
        raise PathRefused(400, "invalid_path", f"the path is longer than {MAX_PATH_CHARS}")
    if not path.startswith(prefix):
        raise PathRefused(400, "invalid_path", f"the path must be relative and begin with {prefix}")
    for segment in path[len(prefix) :].split("/"):
        fault = _segment_fault(segment)
        if fault is not None:
            raise PathRefused(
                400, "invalid_path", f"the path is not canonical: it has {fault}; send it plain"
            )
    return path


def route_pattern(text: str) -> str:
    """An operator's extra route (``--extra-api-route``) in the table's form, or ValueError.

    Accepted as ``rerank/v2``, ``/v1/rerank/v2`` or ``v1/rerank/v2``; ``*`` is one segment.
    """
    route = text.strip().removeprefix("/").removeprefix("v1/")
    segments = route.split("/")
    for segment in segments:
        fault = None if segment == ANY_SEGMENT else _segment_fault(segment)
        if fault is not None:
            raise ValueError(f"API route {text!r} has {fault}")
    return route


@dataclass(frozen=True, slots=True)
class RouteTable:
    """The routes relayed under /v1/: exact ones, and patterns with ``*`` segments."""

    exact: frozenset[str]
    patterns: tuple[tuple[str, ...], ...]

    @classmethod
    def with_extra(cls, extra: Iterable[str] = ()) -> RouteTable:
        routes = [*STANDARD_ROUTES, *(route_pattern(r) for r in extra)]
        exact = frozenset(r for r in routes if ANY_SEGMENT not in r.split("/"))
        patterns = tuple(tuple(r.split("/")) for r in routes if r not in exact)
        return cls(exact, patterns)

    def allows(self, route: str) -> bool:
        """Whether ``route`` (a canonical path less its ``/v1/``) is relayed."""
        if route in self.exact:
            return True
        segments = route.split("/")
        return any(_matches(pattern, segments) for pattern in self.patterns)


def _matches(pattern: tuple[str, ...], segments: list[str]) -> bool:
    if len(pattern) != len(segments):
        return False
    return all(p in (ANY_SEGMENT, s) for p, s in zip(pattern, segments, strict=True))


def relayed_path(path: str, routes: RouteTable) -> str:
    """``path`` when the broker relays it: canonical (else 400) and a known route (else 404)."""
    canonical_path(path)
    if not routes.allows(path[len(API_PREFIX) :]):
        raise PathRefused(
            404,
            "unknown_url",
            f"Invalid URL (POST {path}): not an API route this broker relays",
        )
    return path


def ollama_route(path: str) -> str:
    """The route of an ``/api/...`` path (``chat``, ``blobs/sha256:...``), canonical (else
    ``PathRefused`` 400); what the route is allowed to do is the caller's table above."""
    return canonical_path(path, OLLAMA_PREFIX)[len(OLLAMA_PREFIX) :]


def engine_kind(engine: str) -> str:
    """The kind of an engine as a connector reports it (``ollama/0.6.2`` -> ``ollama``)."""
    return engine.partition("/")[0]


def relay_target(path: str, engine: str) -> str:
    """The path a connector may call on its local LLM for a relayed request, else
    ``PathRefused``: a canonical ``/v1/...`` path, or one of Ollama's relayed routes when
    the engine (``engine``, as the connector detected it) is Ollama."""
    if not path.startswith(OLLAMA_PREFIX):
        return canonical_path(path)
    route = ollama_route(path)
    if route not in OLLAMA_RELAYED:
        raise PathRefused(400, "invalid_path", f"{path} is not a route the connector relays")
    if engine_kind(engine) != OLLAMA_ENGINE:
        raise PathRefused(404, "not_ollama", "this connector's engine does not serve Ollama's API")
    return path
