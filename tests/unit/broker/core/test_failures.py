"""The relay's failures, refusals and drop reasons live once, in ``broker.core.failures``."""

from __future__ import annotations

from pathlib import Path

import pytest

import broker.state.redis as redis_state
from broker.core import failures
from broker.core.relay import MAX_REFUSALS
from broker.state.redis import scripts

REDIS_SIDE = sorted(Path(redis_state.__file__).parent.glob("*.py"))


def texts() -> list[str]:
    """Every text of the table (each part of a ``{...}`` template on its own)."""
    found: list[str] = list(failures.DROP_REASONS.values())
    templates = [f.message for f in failures.FAILURES.values()]
    templates += [message for _cls, message in failures.REFUSALS.values()]
    for template in templates:
        found += [part for part in template.replace("}", "{").split("{")[::2] if len(part) > 6]
    return found


@pytest.mark.parametrize("text", texts())
def test_the_redis_side_holds_no_copy(text: str) -> None:
    for path in REDIS_SIDE:
        source = path.read_text()
        assert text not in source, f"{path.name} repeats {text!r}: take it from broker.core"


@pytest.mark.parametrize("name", sorted(failures.FAILURES))
def test_every_failure_is_rendered_into_the_scripts(name: str) -> None:
    failure = failures.FAILURES[name]
    head = failure.message.partition("{reason}")[0]
    assert f"F.{name} = " in scripts.COMMON
    assert f"status = {failure.status}, code = {scripts.lua_string(failure.code)}" in scripts.COMMON
    assert scripts.lua_string(head)[:-1] in scripts.COMMON


def test_the_scripts_take_the_reasons_and_the_refusal_cap_from_the_core() -> None:
    for key, reason in failures.DROP_REASONS.items():
        assert f"REASON.{key} = {scripts.lua_string(reason)}" in scripts.COMMON
    assert f"local MAX_REFUSALS = {MAX_REFUSALS}" in scripts.COMMON
    assert str(MAX_REFUSALS) not in scripts._COMMON + "".join(scripts.ALL.values())


def test_connector_gone_names_the_reason() -> None:
    failure = failures.connector_gone(failures.EXPIRED)
    assert (failure.status, failure.code) == (502, "connector_lost")
    assert failure.message == "the connector went away (session expired)"


@pytest.mark.parametrize("name", sorted(failures.REFUSALS))
def test_refusals_name_the_model(name: str) -> None:
    cls, template = failures.REFUSALS[name]
    error = failures.refusal(name, "llama")
    assert isinstance(error, cls)
    assert error.message == template.replace("{model}", "llama")


def test_lua_strings_are_ascii_only() -> None:
    with pytest.raises(ValueError, match="ASCII"):
        scripts.lua_string("caf\u00e9")
