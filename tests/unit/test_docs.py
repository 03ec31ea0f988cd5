"""The README's settings tables come from the settings declarations: they must agree."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from broker.settings import BrokerSettings
from connector.settings import ConnectorSettings
from shared.settings import markdown_table

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("cls", [BrokerSettings, ConnectorSettings])
def test_readme_has_settings_table_verbatim(cls: type[BaseSettings]) -> None:
    table = markdown_table(cls)
    assert table in README.read_text(encoding="utf-8"), (
        f"README.md lacks the current {cls.__name__} table; paste this:\n\n{table}\n"
    )


@pytest.mark.parametrize("cls", [BrokerSettings, ConnectorSettings])
def test_table_lists_every_setting(cls: type[BaseSettings]) -> None:
    table = markdown_table(cls)
    prefix = cls.model_config["env_prefix"]
    rows = table.splitlines()[2:]
    assert len(rows) == len(cls.model_fields)
    for name in cls.model_fields:
        assert f"`{prefix}{name.upper()}`" in table
