"""shared/paths.py: the canonical-path rule and the route allowlist, without sockets."""

from __future__ import annotations

import pytest

from shared.paths import (
    STANDARD_ROUTES,
    PathRefused,
    RouteTable,
    canonical_path,
    relayed_path,
    route_pattern,
)

ROUTES = RouteTable.with_extra()


@pytest.mark.parametrize(
    ("path", "fault"),
    [
        ("/v1/../api/create", "'..' segment"),
        ("/v1/./chat/completions", "'.' segment"),
        ("/v1/%2e%2e/api/create", "percent-encoding"),
        ("/v1/chat%2Fcompletions", "percent-encoding"),
        ("/v1/slots/0%3Faction=erase", "percent-encoding"),
        ("/v1//api/delete", "empty segment"),
        ("/v1/chat/completions/", "empty segment"),
        ("/v1/chat\\completions", "character outside"),
        ("/v1/chat/completions?x", "character outside"),
        ("/v1/chat/completions#x", "character outside"),
        ("/v1/chat completions", "character outside"),
        ("http://evil/v1/chat/completions", "begin with /v1/"),
        ("//evil/v1/chat/completions", "begin with /v1/"),
        ("/api/create", "begin with /v1/"),
        ("/v1", "begin with /v1/"),
        ("/v1/" + "a" * 300, "longer than"),
    ],
)
def test_non_canonical_paths_are_refused_with_their_fault(path: str, fault: str) -> None:
    with pytest.raises(PathRefused) as refused:
        canonical_path(path)
    assert (refused.value.status, refused.value.code) == (400, "invalid_path")
    assert fault in refused.value.message


@pytest.mark.parametrize("route", STANDARD_ROUTES)
def test_the_standard_routes_are_relayed(route: str) -> None:
    path = "/v1/" + route.replace("*", "resp_123")
    assert relayed_path(path, ROUTES) == path


@pytest.mark.parametrize(
    "path", ["/v1/api/create", "/v1/models", "/v1/responses/a/b/cancel", "/v1/chat"]
)
def test_other_canonical_paths_are_404(path: str) -> None:
    with pytest.raises(PathRefused) as refused:
        relayed_path(path, ROUTES)
    assert (refused.value.status, refused.value.code) == (404, "unknown_url")


def test_extra_routes_in_any_spelling() -> None:
    table = RouteTable.with_extra(["tokenize", "/v1/x/*/y", "v1/detokenize"])
    assert table.allows("tokenize") and table.allows("detokenize")
    assert table.allows("x/abc/y")
    assert not table.allows("x/abc/z") and not table.allows("x/y")


@pytest.mark.parametrize("bad", ["../a", "a//b", "a/%2e", "a/./b", "a?b", ""])
def test_bad_extra_routes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        route_pattern(bad)
