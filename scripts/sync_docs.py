"""Rewrite the option tables in README.md from the settings classes (the one declaration).

Run: uv run python scripts/sync_docs.py   (tests/unit/test_docs.py fails when out of date)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.settings import BrokerSettings
from connector.settings import ConnectorSettings
from shared.settings import markdown_table

README = Path(__file__).resolve().parent.parent / "README.md"
TABLES = {"broker-options": BrokerSettings, "connector-options": ConnectorSettings}


def render(text: str) -> str:
    for marker, cls in TABLES.items():
        pattern = re.compile(rf"(<!-- {marker}:start -->).*?(<!-- {marker}:end -->)", re.DOTALL)
        if not pattern.search(text):
            raise SystemExit(f"README.md lacks the {marker} markers")
        table = markdown_table(cls)
        text = pattern.sub(lambda m, t=table: f"{m.group(1)}\n{t}\n{m.group(2)}", text)
    return text


if __name__ == "__main__":
    README.write_text(render(README.read_text(encoding="utf-8")), encoding="utf-8")
    print("README.md option tables updated")
