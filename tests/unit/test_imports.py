"""The import arrows of docs/architecture.md ("Import rules"), checked on the source's AST.

The relay core does no I/O, and each part of the broker imports only what its role needs:
a module that breaks an arrow fails here with its name and the import. Allowed exceptions
are listed in ``EXCEPTIONS`` with the reason; the doc's table states the same arrows.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "broker" / "core"
FORBIDDEN = {"asyncio", "quart", "hypercorn", "time", "socket", "threading", "httpx", "anyio"}

ENTRY_POINTS = ("broker.__main__", "broker.cli", "broker.server")
ROUTES = ("broker.relay", "broker.api", "broker.portal")
STATE_IMPLEMENTATIONS = ("broker.state.memory", "broker.state.redis")

# (importer, imported): why this arrow is allowed anyway.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("broker.broker_state", "broker.state.memory.limits"): (
        "a BrokerState built without limits (tests, one broker) counts them in memory"
    ),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(path: Path) -> Iterator[str]:
    """Every module the file imports, lazy imports inside functions included."""
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else None
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = (package or _module_name(path)).split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            # ``from broker.accounts import keys`` imports the module broker.accounts.keys.
            names = (alias.name for alias in node.names)
            yield from (f"{base}.{name}" for name in names if _is_module(base, name))


def _is_module(package: str, name: str) -> bool:
    folder = ROOT.joinpath(*package.split("."))
    return (folder / f"{name}.py").is_file() or (folder / name / "__init__.py").is_file()


def _within(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _edges(*packages: str) -> list[tuple[str, str]]:
    return sorted(
        {
            (_module_name(path), target)
            for package in packages
            for path in (ROOT / package).rglob("*.py")
            for target in _imported(path)
            if target.split(".")[0] in {"broker", "connector", "shared"}
        }
    )


EDGES = _edges("broker", "connector", "shared")


def _violations(importers: tuple[str, ...], forbidden: tuple[str, ...]) -> list[tuple[str, str]]:
    return [
        (src, dst)
        for src, dst in EDGES
        if _within(src, *importers)
        and _within(dst, *forbidden)
        and not _within(dst, src)
        and (src, dst) not in EXCEPTIONS
    ]


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_module_imports_no_io(path: Path) -> None:
    assert not {name.split(".")[0] for name in _imported(path)} & FORBIDDEN


def test_core_imports_only_itself_and_shared() -> None:
    """broker.core may use shared/ (protocol models, errors) but no other broker module."""
    bad = [(s, d) for s, d in EDGES if _within(s, "broker.core") and _within(d, "broker")]
    assert [(s, d) for s, d in bad if not _within(d, "broker.core")] == []
    assert len(list(CORE.glob("*.py"))) >= 6


def test_state_implementations_never_import_each_other() -> None:
    assert _violations(("broker.state.memory",), ("broker.state.redis",)) == []
    assert _violations(("broker.state.redis",), ("broker.state.memory",)) == []


def test_state_never_imports_routes_or_what_builds_it() -> None:
    outside = (*ROUTES, "broker.composition", "broker.broker_state", *ENTRY_POINTS)
    assert _violations(("broker.state",), outside) == []


def test_relay_and_api_meet_only_through_the_state_interface() -> None:
    assert _violations(("broker.relay",), ("broker.api",)) == []
    assert _violations(("broker.api",), ("broker.relay",)) == []
    assert _violations(ROUTES, STATE_IMPLEMENTATIONS) == []


@pytest.mark.parametrize("leaf", ["broker.accounts", "broker.usage"])
def test_accounts_and_usage_are_leaves(leaf: str) -> None:
    """They use the core and themselves; nothing of state, routes, settings or each other."""
    tops = {p.stem for p in (ROOT / "broker").iterdir()} - {"core", "__init__", "__pycache__"}
    others = tuple(f"broker.{top}" for top in tops)
    assert _violations((leaf,), tuple(o for o in others if o != leaf)) == []


def test_chat_imports_no_route_state_or_builder() -> None:
    """broker.chat drives the API relay it is handed (an ASGI callable), never imports it."""
    outside = (*ROUTES, "broker.state", "broker.composition", "broker.broker_state")
    assert _violations(("broker.chat",), (*outside, *ENTRY_POINTS)) == []


def test_only_entry_points_import_the_cli_and_the_composition_root() -> None:
    importers = [
        (s, d)
        for s, d in EDGES
        if _within(d, "broker.cli", "broker.composition")
        and not _within(s, *ENTRY_POINTS)
        and not _within(d, s)
    ]
    assert importers == []


def test_broker_and_connector_never_import_each_other() -> None:
    assert _violations(("broker",), ("connector",)) == []
    assert _violations(("connector",), ("broker",)) == []


def test_shared_imports_neither_broker_nor_connector() -> None:
    """shared/bench starts both as processes (by module name), never by import."""
    assert _violations(("shared",), ("broker", "connector")) == []


def test_every_exception_is_still_needed() -> None:
    assert [pair for pair in EXCEPTIONS if pair not in EDGES] == []
