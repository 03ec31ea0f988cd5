"""The models file's aliases: strict checks, and re-reading on change (last good kept)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.core.aliases import Alias, Target
from broker.usage.models_file import ModelsFileWatch
from broker.usage.prices import PricesFileError, parse_models_file

GOOD = """\
aliases:
  chat:
    - {model: llama3:70b, connector: gpu-box}
    - llama3:70b
  llama3:8b:            # shadows the served model of its name: that model, then another
    - llama3:8b
    - {model: qwen2.5:7b}
"""


def test_aliases_without_prices() -> None:
    catalog = parse_models_file(GOOD, "models.yaml")
    assert catalog.prices is None  # no cost columns for an alias-only file
    assert catalog.aliases.get("chat") == Alias(
        "chat", (Target("llama3:70b", "gpu-box"), Target("llama3:70b"))
    )
    shadow = catalog.aliases.get("llama3:8b")
    assert shadow is not None and shadow.targets[0] == Target("llama3:8b")


def test_prices_and_aliases_together() -> None:
    text = "currency: EUR\nmodels:\n  m: {input_per_million: 1, output_per_million: 2}\n"
    catalog = parse_models_file(text + "aliases:\n  a: [m]\n", "models.yaml")
    assert catalog.prices is not None and catalog.prices.currency == "EUR"
    assert catalog.aliases.get("a") == Alias("a", (Target("m"),))


@pytest.mark.parametrize(
    ("aliases", "message"),
    [
        ("a: []", "at least one target"),
        ("a: [m, m]", "listed twice"),
        ("a: [b]\n  b: [m]", "another alias"),
        ("'bad name': [m]", "may hold only"),
        ("a: ['-m']", "may not start with '-'"),
        ("a: [{model: m, connector: ''}]", "1 to 200 characters"),
        ("a: [{model: m, connectr: x}]", "Extra inputs are not permitted"),
        ("a: [{connector: x}]", "Field required"),
        ("a: m", "valid list"),
        ("a: [" + ", ".join(f"m{i}" for i in range(17)) + "]", "at most 16 targets"),
    ],
)
def test_a_bad_alias_says_what_is_wrong(aliases: str, message: str) -> None:
    with pytest.raises(PricesFileError, match=message):
        parse_models_file(f"aliases:\n  {aliases}\n", "models.yaml")


def _write(path: Path, text: str, tick: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(tick * 10**9, tick * 10**9))  # a distinct stamp on every write


def test_the_watch_follows_edits_and_keeps_the_last_good(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    _write(path, "aliases:\n  a: [m1]\n", 1)
    watch = ModelsFileWatch(path)
    assert watch.reload() is None  # unchanged
    _write(path, "aliases:\n  a: [m2]\n", 2)
    changed = watch.reload()
    assert changed is not None and changed.aliases.get("a") == Alias("a", (Target("m2"),))
    _write(path, "aliases:\n  a: []\n", 3)
    assert watch.reload() is None
    assert watch.error is not None and "at least one target" in watch.error
    assert watch.catalog.aliases.get("a") == Alias("a", (Target("m2"),))
    _write(path, "aliases:\n  b: [m3]\n", 4)
    fixed = watch.reload()
    assert fixed is not None and watch.error is None and fixed.aliases.get("a") is None


def test_a_broken_file_at_start_refuses(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("aliases:\n  a: [b]\n  b: [m]\n")
    with pytest.raises(PricesFileError, match="another alias"):
        ModelsFileWatch(path)
