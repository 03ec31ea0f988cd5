"""`remotellm-connector enroll` without a server: what it says before it asks anyone."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from connector import cli as connector_cli
from connector.enroll import SECRET_FILE, enrollment_secret, write_private
from connector.settings import ConnectorSettings


def test_enroll_with_a_token_already_does_nothing(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "credentials").write_text("ct-have-one\n", encoding="utf-8")
    result = CliRunner().invoke(
        connector_cli.main,
        ["enroll", "--broker-url", "http://127.0.0.1:9", "--data-dir", str(tmp_path)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "has a token already" in result.output and "ct-have-one" not in result.output


def test_enroll_is_listed_in_the_help() -> None:
    result = CliRunner().invoke(connector_cli.main, ["--help"], catch_exceptions=False)
    assert "enroll" in result.output


def test_the_enrollment_secret_is_kept_private_and_reused(tmp_path: Path) -> None:
    settings = ConnectorSettings(broker_url="http://b", data_dir=tmp_path / "d")
    first = enrollment_secret(settings)
    assert len(first) == 64 and enrollment_secret(settings) == first
    path = tmp_path / "d" / SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700
    write_private(tmp_path / "d" / "credentials", "ct-x")
    assert stat.S_IMODE((tmp_path / "d" / "credentials").stat().st_mode) == 0o600
