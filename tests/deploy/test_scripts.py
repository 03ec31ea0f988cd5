"""Static checks of the shell scripts, and their answers to wrong use."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.deploy.helpers import DEPLOY, REPO, run

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


# --- scripts/test: the README's test command ----------------------------------------------

TEST_SCRIPT = REPO / "scripts" / "test"
PACKAGES = [
    line.split("#")[0].strip()
    for line in (REPO / "scripts" / "debian-packages").read_text().splitlines()
    if line.split("#")[0].strip()
]


@pytest.mark.parametrize(
    "script", [TEST_SCRIPT, REPO / "scripts" / "check", REPO / ".ci" / "run"], ids=str
)
def test_repo_scripts_pass_shellcheck(script: Path) -> None:
    result = run(["shellcheck", script], check=False, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert os.access(script, os.X_OK)


def test_package_list_is_declared_once() -> None:
    assert {"python3-seccomp", "chromium", "redis-server", "squid", "nginx-light"} <= set(PACKAGES)
    for path in (REPO / ".ci" / "run", REPO / "scripts" / "check", TEST_SCRIPT):
        assert "python3-seccomp" not in path.read_text(), path
    # CI and the gate take the newcomer's path.
    assert "exec bash scripts/check" in (REPO / ".ci" / "run").read_text()
    assert "exec bash scripts/test" in (REPO / "scripts" / "check").read_text()
    assert "bash scripts/test" in (REPO / "README.md").read_text().split("```")[1]


def _test_script_fakes(tmp_path: Path, uid: int, missing: list[str]) -> Path:
    """dpkg-query knows every package but ``missing``; apt-get and uv only record."""
    log = tmp_path / "calls.log"
    missing_words = " ".join(missing)
    return fake_bin(
        tmp_path,
        id=f'[ "$1" = -u ] && echo {uid} || echo "uid={uid}"',
        **{
            "dpkg-query": f'for p in {missing_words}; do [ "$p" = "$3" ] && exit 1; done\n'
            "printf installed",
            "apt-get": f'echo "apt-get $*" >> {log}',
            "uv": f'echo "uv $*" >> {log}',
        },
    )


def _calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_test_script_with_everything_installed_runs_pytest(tmp_path: Path) -> None:
    bin_dir = _test_script_fakes(tmp_path, uid=1000, missing=[])
    env = script_env(tmp_path, bin_dir, SYSTEM_PATH)
    result = run(["bash", TEST_SCRIPT, "tests/unit", "-q"], env=env)
    assert result.stderr == ""
    assert _calls(tmp_path) == ["uv sync --frozen", "uv run --frozen pytest tests/unit -q"]


def test_test_script_as_root_installs_what_is_missing(tmp_path: Path) -> None:
    bin_dir = _test_script_fakes(tmp_path, uid=0, missing=["chromium", "redis-server"])
    env = script_env(tmp_path, bin_dir, SYSTEM_PATH)
    run(["bash", TEST_SCRIPT, "-x"], env=env)
    assert _calls(tmp_path) == [
        "apt-get update -qq",
        "apt-get install -y -qq --no-install-recommends chromium redis-server",
        "uv sync --frozen",
        "uv run --frozen pytest -x",
    ]


def test_test_script_without_root_stops_with_the_command_to_run(tmp_path: Path) -> None:
    bin_dir = _test_script_fakes(tmp_path, uid=1000, missing=["python3-seccomp", "squid"])
    env = script_env(tmp_path, bin_dir, SYSTEM_PATH)
    result = run(["bash", TEST_SCRIPT], check=False, env=env)
    assert result.returncode == 1
    assert "    sudo apt-get install -y python3-seccomp squid\n" in result.stderr
    assert _calls(tmp_path) == []  # nothing installed, no test run


def test_test_script_without_uv_says_how_to_get_it(tmp_path: Path) -> None:
    bin_dir = _test_script_fakes(tmp_path, uid=1000, missing=[])
    (bin_dir / "uv").unlink()
    env = script_env(tmp_path, bin_dir, f"{bin_dir}:/usr/bin:/bin")
    result = run(["bash", TEST_SCRIPT], check=False, env=env)
    assert result.returncode == 1
    assert "python3 -m pip install uv" in result.stderr
