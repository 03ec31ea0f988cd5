"""The one YAML file store under keys, users and enrollment (broker/accounts/store.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.accounts.store import FileBroken, YamlFileStore
from shared.errors import ConfigError


def _parse(text: str, path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping")
    return data


def _store(path: Path, **kw: Any) -> YamlFileStore[dict[str, Any]]:
    store = YamlFileStore(path, name="test", parse=_parse, empty=dict, dump=dict, **kw)
    store.reload()
    return store


def _edit(path: Path, text: str) -> None:
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text, encoding="utf-8")
    if path.stat().st_mtime_ns <= before:
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


def _add(key: str) -> Any:
    def change(doc: dict[str, Any]) -> None:
        doc[key] = True

    return change


def test_a_broken_file_is_kept_and_never_overwritten_by_a_change(tmp_path: Path) -> None:
    store = _store(tmp_path / "f.yaml")
    store.mutate(_add("a"))
    _edit(store.path, "a: [unclosed\n")
    assert not store.reload()
    assert store.error is not None and "not valid YAML" in store.error
    assert store.doc == {"a": True}  # the last good content serves
    assert not store.reload()  # logged once: the same broken version is not re-read
    with pytest.raises(FileBroken, match="fix the file first"):
        store.mutate(_add("b"))
    assert store.path.read_text() == "a: [unclosed\n"
    _edit(store.path, "c: 1\n")
    assert store.reload() and store.error is None
    store.mutate(_add("b"))
    assert yaml.safe_load(store.path.read_text()) == {"c": 1, "b": True}


def test_a_change_applies_on_top_of_an_edit_made_meanwhile(tmp_path: Path) -> None:
    store = _store(tmp_path / "f.yaml")
    store.mutate(_add("a"))
    _edit(store.path, "a: true\noperator: 1\n")  # not reloaded yet
    store.mutate(_add("b"))
    assert yaml.safe_load(store.path.read_text()) == {"a": True, "operator": 1, "b": True}


def test_nothing_changed_writes_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path / "f.yaml")
    store.mutate(_add("a"))
    before = store.path.stat().st_mtime_ns
    store.mutate(_add("a"))
    assert store.path.stat().st_mtime_ns == before
    assert not (tmp_path / "g.yaml").exists()
    _store(tmp_path / "g.yaml").mutate(lambda doc: None)
    assert not (tmp_path / "g.yaml").exists()


def test_a_required_file_that_goes_missing_keeps_the_last_content(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        YamlFileStore(path, name="t", parse=_parse, empty=dict, required=True).load()
    _edit(path, "a: 1\n")
    store = YamlFileStore(path, name="t", parse=_parse, empty=dict, required=True)
    store.load()
    path.unlink()
    assert not store.reload()
    assert store.doc == {"a": 1} and store.error is not None


def test_a_read_only_file_refuses_writes(tmp_path: Path) -> None:
    store = YamlFileStore(tmp_path / "f.yaml", name="t", parse=_parse, empty=dict)
    with pytest.raises(TypeError):
        store.mutate(_add("a"))


def test_writes_are_private(tmp_path: Path) -> None:
    store = _store(tmp_path / "d" / "f.yaml")
    store.mutate(_add("a"))
    assert store.path.stat().st_mode & 0o777 == 0o600
