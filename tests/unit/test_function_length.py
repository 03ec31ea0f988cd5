"""No function over 60 lines in the portal or the composition root (docs/architecture.md).

Long functions there used to hold every route as a closure over one service locator; the
portal's routes are module-level functions now, and this keeps them (and their helpers)
short. Checked on the source's AST, nested functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKED = (ROOT / "broker" / "portal", ROOT / "broker" / "composition.py")
MAX_LINES = 60


def _files() -> list[Path]:
    found = [path for target in CHECKED if target.is_dir() for path in target.rglob("*.py")]
    return sorted([*found, *(target for target in CHECKED if target.is_file())])


def _too_long(source: str, name: str) -> list[str]:
    return [
        f"{name}:{node.lineno} {node.name} ({length} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (length := (node.end_lineno or node.lineno) - node.lineno + 1) > MAX_LINES
    ]


def test_no_function_over_60_lines() -> None:
    files = _files()
    assert len(files) > 10  # the portal's modules were found
    found = [
        entry
        for path in files
        for entry in _too_long(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    ]
    assert found == []


def test_the_check_sees_nested_long_functions() -> None:
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_LINES))
    source = f"def outer() -> None:\n    def inner() -> None:\n{body}\n"
    assert _too_long(source, "m.py") == [
        f"m.py:1 outer ({MAX_LINES + 2} lines)",
        f"m.py:2 inner ({MAX_LINES + 1} lines)",
    ]
