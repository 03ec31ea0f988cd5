"""Static checks of the shell scripts, and their answers to wrong use."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.deploy.helpers import DEPLOY, run

SCRIPTS = sorted(DEPLOY.rglob("*.sh"))
INSTALLERS = [DEPLOY / "install-linux.sh", DEPLOY / "install-macos.sh"]


def test_there_are_scripts() -> None:
    assert {p.name for p in SCRIPTS} >= {"install-linux.sh", "install-macos.sh", "common.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_shellcheck(script: Path) -> None:
    result = run(["shellcheck", "--external-sources", script], check=False, cwd=script.parent)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", INSTALLERS, ids=lambda p: p.name)
def test_installers_are_strict_and_executable(script: Path) -> None:
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(script, os.X_OK)


@pytest.mark.parametrize("script", INSTALLERS, ids=lambda p: p.name)
def test_help(script: Path) -> None:
    result = run(["bash", script, "--help"])
    for option in ("--broker", "--connector", "--prefix", "--uninstall", "--purge"):
        assert option in result.stdout


def fake_bin(tmp_path: Path, **scripts: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return bin_dir


def script_env(tmp_path: Path, bin_dir: Path, path: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REMOTELLM_", "UV"))}
    env.update(PATH=f"{bin_dir}:{path}", HOME=str(tmp_path / "home"), **extra)
    return env


SYSTEM_PATH = "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.mark.parametrize("script", INSTALLERS, ids=lambda p: p.name)
def test_nothing_to_install(script: Path, tmp_path: Path) -> None:
    result = run(["bash", script], check=False, env=script_env(tmp_path, tmp_path, SYSTEM_PATH))
    assert result.returncode != 0
    assert "--broker, --connector or both" in result.stderr


@pytest.mark.parametrize("script", INSTALLERS, ids=lambda p: p.name)
def test_not_root(script: Path, tmp_path: Path) -> None:
    # A fake `id` says we are an ordinary user; the script must stop before touching /.
    bin_dir = fake_bin(tmp_path, id='[ "$1" = -u ] && echo 1000 || echo "uid=1000"')
    env = script_env(tmp_path, bin_dir, SYSTEM_PATH)
    result = run(["bash", script, "--broker"], check=False, env=env)
    assert result.returncode != 0
    assert "run this as root" in result.stderr


@pytest.mark.parametrize("script", INSTALLERS, ids=lambda p: p.name)
def test_no_uv(script: Path, tmp_path: Path) -> None:
    # uv is neither on PATH (the plain system one) nor in the usual places under HOME.
    bin_dir = fake_bin(tmp_path, systemctl="exit 0", launchctl="exit 0", dscl="exit 0")
    env = script_env(tmp_path, bin_dir, SYSTEM_PATH, REMOTELLM_ROOT=str(tmp_path / "root"))
    if os.path.exists("/usr/local/bin/uv"):
        env["UV"] = str(tmp_path / "missing-uv")  # an explicit UV that is not there
    result = run(["bash", script, "--connector"], check=False, env=env)
    assert result.returncode != 0
    assert re.search(r"uv not found|UV=\S+ is not an executable", result.stderr), result.stderr
    assert not (tmp_path / "root").exists(), "it changed files before giving up"


@pytest.mark.parametrize("script", INSTALLERS, ids=lambda p: p.name)
def test_bad_prefix(script: Path, tmp_path: Path) -> None:
    env = script_env(tmp_path, tmp_path, SYSTEM_PATH, REMOTELLM_ROOT=str(tmp_path / "root"))
    for prefix in ("relative/dir", "/usr", "/opt/with space"):
        result = run(["bash", script, "--broker", "--prefix", prefix], check=False, env=env)
        assert result.returncode != 0, prefix
        assert "--prefix" in result.stderr
