from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.bench.upstream import FakeLLM
from tests.deploy.helpers import REPO, SANDBOX, SYSTEM_PYTHON, run

# Filled by the tests that measure them, printed at the end of the run.
REPORT: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT:
        terminalreporter.section("deployment report")
        for name, value in sorted(REPORT.items()):
            terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture(scope="session")
def world_dir() -> Iterator[Path]:
    """A scratch dir that the unprivileged service user (nobody) can enter.

    pytest's tmp_path lives under a mode-0700 dir, so a program sandboxed as nobody could
    not even reach its venv there.
    """
    path = Path(tempfile.mkdtemp(prefix="remotellm-deploy-", dir="/tmp"))
    path.chmod(0o755)
    shutil.copy(SANDBOX, path / "sandbox.py")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def wheel(world_dir: Path) -> Path:
    out = world_dir / "dist"
    run(["uv", "build", "--quiet", "--wheel", "--out-dir", out, REPO])
    wheels = list(out.glob("remotellm-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="session")
def wheel_venv(world_dir: Path, wheel: Path) -> Path:
    """The wheel installed into a fresh venv outside the source tree.

    Made from the system Python (what a Debian service would use, and readable by the
    sandboxed service user), with the dependency versions of uv.lock as constraints.
    """
    venv = world_dir / "wheel-venv"
    env = {**os.environ, "UV_LINK_MODE": "copy"}
    run(["uv", "venv", "--quiet", "--python", SYSTEM_PYTHON, venv], env=env)
    constraints = world_dir / "constraints.txt"
    export: list[str | Path] = ["uv", "export", "--quiet", "--project", REPO, "--frozen"]
    run(
        [*export, "--no-dev", "--no-emit-project", "--no-hashes", "--no-header", "-o", constraints],
        env=env,
    )
    install: list[str | Path] = [
        "uv",
        "pip",
        "install",
        "--quiet",
        "--python",
        venv / "bin" / "python",
    ]
    run([*install, "--constraint", constraints, wheel], env=env, cwd=world_dir)
    return venv


@pytest.fixture(scope="session")
def fake_llm() -> Iterator[FakeLLM]:
    fake = FakeLLM(models=["tiny-model"], chunk_delay=0.05)
    fake.start_in_thread()
    yield fake
    fake.stop_in_thread()


FAKE_RECORD = """#!/bin/sh
echo "$(basename "$0") $*" >> "$FAKE_LOG"
"""

# chown: record, then really chown, with the service user played by nobody.
FAKE_CHOWN = """#!/bin/sh
echo "chown $*" >> "$FAKE_LOG"
owner=${1%%:*}
group=${1#*:}
map() {
    case "$1" in
    remotellm | _remotellm) echo 65534 ;;
    root | wheel) echo 0 ;;
    *) echo "fake chown: unexpected name $1" >&2; exit 1 ;;
    esac
}
exec /bin/chown "$(map "$owner"):$(map "$group")" "$2"
"""

FAKE_USERADD = """#!/bin/sh
echo "useradd $*" >> "$FAKE_LOG"
for name; do :; done
echo "$name" >> "$FAKE_STATE/users"
"""

FAKE_USERDEL = """#!/bin/sh
echo "userdel $*" >> "$FAKE_LOG"
grep -vx "$1" "$FAKE_STATE/users" > "$FAKE_STATE/users.new" || true
mv "$FAKE_STATE/users.new" "$FAKE_STATE/users"
"""

FAKE_GETENT = """#!/bin/sh
if [ "$1" = passwd ] && grep -qx "$2" "$FAKE_STATE/users" 2>/dev/null; then
    echo "$2:x:65534:65534:RemoteLLM:/var/lib/remotellm:/usr/sbin/nologin"
    exit 0
fi
exit 2
"""

FAKE_DSCL = """#!/bin/sh
echo "dscl $*" >> "$FAKE_LOG"
case "$2" in
-read) grep -qx "$3" "$FAKE_STATE/dscl" 2>/dev/null ;;
-list)
    if [ "$3" = /Users ]; then printf 'root 0\\n_www 70\\n_taken 300\\n'
    else printf 'wheel 0\\n_other 301\\n'; fi ;;
-create)
    if [ $# -eq 5 ] && [ "$4" = UniqueID ]; then echo "$3" >> "$FAKE_STATE/dscl"; fi ;;
-delete)
    grep -vx "$3" "$FAKE_STATE/dscl" > "$FAKE_STATE/dscl.new" || true
    mv "$FAKE_STATE/dscl.new" "$FAKE_STATE/dscl" ;;
esac
"""

FAKE_LAUNCHCTL = """#!/bin/sh
echo "launchctl $*" >> "$FAKE_LOG"
case "$1" in
print) grep -qx "$2" "$FAKE_STATE/launchd" 2>/dev/null ;;
bootstrap) echo "system/$(basename "$3" .plist)" >> "$FAKE_STATE/launchd" ;;
bootout)
    grep -vx "$2" "$FAKE_STATE/launchd" > "$FAKE_STATE/launchd.new" || true
    mv "$FAKE_STATE/launchd.new" "$FAKE_STATE/launchd" ;;
esac
"""


@dataclass
class Fakes:
    """Recording stand-ins for the system commands the install scripts call."""

    bin: Path
    log: Path
    state: Path

    def env(self, root: Path, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "REMOTELLM_ROOT": str(root),
            "FAKE_LOG": str(self.log),
            "FAKE_STATE": str(self.state),
            **extra,
        }

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def clear(self) -> None:
        self.log.write_text("")


def make_fakes(base: Path) -> Fakes:
    bin_dir, state = base / "fakebin", base / "fakestate"
    bin_dir.mkdir(parents=True)
    state.mkdir()
    scripts = {
        "systemctl": FAKE_RECORD,
        "chown": FAKE_CHOWN,
        "useradd": FAKE_USERADD,
        "userdel": FAKE_USERDEL,
        "getent": FAKE_GETENT,
        "dscl": FAKE_DSCL,
        "launchctl": FAKE_LAUNCHCTL,
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return Fakes(bin_dir, base / "calls.log", state)


@pytest.fixture
def fakes(tmp_path: Path) -> Fakes:
    return make_fakes(tmp_path)
