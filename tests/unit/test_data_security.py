"""Pure parts of the data and logs fixes: users-file diffs, the board's age, connector
failure texts, control-character escaping, URL credential redaction, cleartext brokers."""

from __future__ import annotations

import json
import logging

import pytest

from broker.accounts.revocations import RevocationBoard
from broker.accounts.users_change import UsersChange, users_change
from broker.core.errors import CONNECTOR_FAILURE, connector_failure
from connector.settings import cleartext_broker
from shared.logging import configure_logging, escape_controls, redact_url_credentials


def test_first_load_publishes_blocks_only() -> None:
    change = users_change(None, {"k1": "u1"}, frozenset(), frozenset({"u1"}))
    assert change == UsersChange(blocked=frozenset({"u1"}))


def test_later_loads_publish_what_changed() -> None:
    before = {"k1": "u1", "k2": "u2"}
    change = users_change(before, {"k2": "u2", "k3": "u2"}, frozenset({"u1"}), frozenset({"u2"}))
    assert change.revoked_keys == {"k1"}
    assert change.blocked == {"u2"} and change.unblocked == {"u1"}
    assert users_change(before, before, frozenset(), frozenset()).empty


def test_board_is_stale_until_read_and_after_max_age() -> None:
    now = [100.0]
    board = RevocationBoard(redis=None, prefix="p:", max_age=10.0, clock=lambda: now[0])  # type: ignore[arg-type]
    assert board.stale()
    board.synced_at = 100.0
    now[0] = 109.0
    assert not board.stale()
    now[0] = 110.5
    assert board.stale()


@pytest.mark.parametrize(
    ("error_type", "status", "want"),
    [
        ("upstream_unreachable", 502, (502, "upstream_unreachable")),
        ("upstream_timeout", 504, (504, "upstream_timeout")),
        (None, 503, (503, "upstream_error")),
        ("made up by the connector", 502, (502, CONNECTOR_FAILURE)),
        ("upstream_error", 200, (502, "upstream_error")),
        ("upstream_error", 401, (502, "upstream_error")),
        ("cancelled", 499, (499, "cancelled")),
    ],
)
def test_connector_failures_get_fixed_texts(
    error_type: str | None, status: int, want: tuple[int, str]
) -> None:
    got_status, code, message = connector_failure(error_type, status)
    assert (got_status, code) == want
    assert "http" not in message


def test_controls_are_escaped() -> None:
    assert escape_controls("a\x1b[2J\nb\x07\x9b") == "a\\x1b[2J\\nb\\x07\\x9b"
    assert escape_controls("plain text é") == "plain text é"


def test_url_credentials_are_redacted() -> None:
    text = "cannot reach http://bob:pw@llm:8080/v1 nor https://tok@x.example"
    assert redact_url_credentials(text) == (
        "cannot reach http://[redacted]@llm:8080/v1 nor https://[redacted]@x.example"
    )
    assert redact_url_credentials("mail me at a@b.example") == "mail me at a@b.example"


@pytest.mark.parametrize(
    ("url", "cleartext"),
    [
        ("http://broker.example:8080", True),
        ("http://10.0.0.5", True),
        ("https://broker.example", False),
        ("http://127.0.0.1:8080", False),
        ("http://localhost:8080", False),
        ("http://[::1]:8080", False),
    ],
)
def test_cleartext_broker(url: str, cleartext: bool) -> None:
    assert cleartext_broker(url) is cleartext


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_library_log_lines_are_escaped_and_redacted(
    fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # hypercorn and httpx log through the stdlib: the same escaping and redaction apply.
    configure_logging("info", fmt)
    try:
        logging.getLogger("hypercorn.error").warning(
            "bad line \x1b[2J\nforged from http://bob:hunter2@llm.local:8080/v1"
        )
        err = capsys.readouterr().err
    finally:
        with capsys.disabled():  # bind the handlers to the real stderr again, not capsys's
            configure_logging("info", "json")
    assert err.count("\n") == 1, err
    assert "\x1b" not in err and "hunter2" not in err
    assert "hypercorn.error" in err
    if fmt == "json":
        line = json.loads(err)
        assert line["level"] == "warning" and "[redacted]@llm.local" in line["event"]
