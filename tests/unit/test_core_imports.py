"""The relay core does no I/O: nothing in broker/core imports asyncio, Quart, Hypercorn or time."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "broker" / "core"
FORBIDDEN = {"asyncio", "quart", "hypercorn", "time", "socket", "threading", "httpx", "anyio"}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_module_imports_no_io(path: Path) -> None:
    assert not _imports(path) & FORBIDDEN


def test_core_imports_only_itself_and_shared() -> None:
    """broker.core may use shared/ (protocol models, errors) but no other broker module."""
    for path in CORE.glob("*.py"):
        broker_modules = {
            n.module
            for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("broker.")
        }
        assert all(m.startswith("broker.core") for m in broker_modules), (path, broker_modules)
    assert len(list(CORE.glob("*.py"))) >= 6
