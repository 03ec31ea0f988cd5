"""The systemd units: systemd-analyze accepts them, their settings fit the programs, and
the programs really run under the confinement the units ask for (emulated by sandbox.py,
since there is no systemd to start them here)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx
import pytest
from pydantic_settings import BaseSettings

from broker.settings import BrokerSettings
from connector.settings import ConnectorSettings
from tests.deploy.conftest import REPORT
from tests.deploy.helpers import (
    BANNER_KEY,
    DEPLOY,
    SYSTEM_PYTHON,
    base_env,
    entry_points,
    env_names,
    http_status,
    run,
    running,
    start,
    unit_environment,
    unit_settings,
    wait_for,
)
from tests.support.net import free_ports

UNITS = {
    "broker": DEPLOY / "systemd" / "remotellm-broker.service",
    "connector": DEPLOY / "systemd" / "remotellm-connector.service",
}
SETTINGS: dict[str, type[BaseSettings]] = {"broker": BrokerSettings, "connector": ConnectorSettings}
MAX_EXPOSURE = 2.0


def with_exec_start(unit: Path, dest_dir: Path, program: Path) -> Path:
    """A copy of the unit whose ExecStart names ``program`` (which exists)."""
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={program}", unit.read_text(), flags=re.M)
    dest = dest_dir / unit.name
    dest.write_text(text)
    return dest


@pytest.mark.parametrize("component", sorted(UNITS))
def test_systemd_analyze_verify(component: str, tmp_path: Path) -> None:
    stub = tmp_path / "bin" / f"remotellm-{component}"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = with_exec_start(UNITS[component], tmp_path, stub)
    result = run(["systemd-analyze", "verify", "--man=no", unit], check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize("component", sorted(UNITS))
def test_systemd_analyze_security(component: str) -> None:
    result = run(["systemd-analyze", "security", "--offline=true", UNITS[component]])
    found = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", result.stdout)
    assert found, result.stdout
    score = float(found.group(1))
    REPORT[f"systemd-analyze security remotellm-{component}.service"] = (
        f"{score} {found.group(2)} (10 = unprotected)"
    )
    assert score <= MAX_EXPOSURE, result.stdout


@pytest.mark.parametrize("component", sorted(UNITS))
def test_unit_settings_fit_the_program(component: str) -> None:
    unit = UNITS[component]
    s = {key: values[-1] for key, values in unit_settings(unit).items()}
    settings_cls = SETTINGS[component]
    drain = settings_cls.model_fields["drain_timeout"].default

    exec_start = s["ExecStart"].split()
    assert exec_start[0] == f"/opt/remotellm/venv/bin/remotellm-{component}"
    assert Path(exec_start[0]).name in entry_points()
    assert s["User"] == s["Group"] == "remotellm"
    assert s["Restart"] == "always"
    assert float(s["RestartSec"]) <= 5
    assert s["KillSignal"] == "SIGTERM"
    assert float(s["TimeoutStopSec"]) > drain, "systemd would SIGKILL a draining service"
    assert s["EnvironmentFile"] == f"/etc/remotellm/{component}.env"
    for name in unit_environment(unit):
        assert name == "PYTHONUNBUFFERED" or name in env_names(settings_cls), name

    assert s["CapabilityBoundingSet"] == "" and s["AmbientCapabilities"] == ""
    assert "CAP_NET_BIND_SERVICE" in unit.read_text(), "the comment on low ports is gone"
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "ProtectKernelTunables",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ):
        assert s[key] == "yes", key
    assert s["ProtectSystem"] == "strict"
    assert s["RestrictAddressFamilies"].split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert "@system-service" in unit_settings(unit)["SystemCallFilter"]

    if component == "broker":
        data_dir = unit_environment(unit)["REMOTELLM_BROKER_DATA_DIR"]
        assert data_dir == "/var/lib/remotellm/broker"
        assert s["ReadWritePaths"] == data_dir
        assert f"/var/lib/{s['StateDirectory']}" == data_dir
    else:
        assert "ReadWritePaths" not in s and "StateDirectory" not in s


def sandboxed(world_dir: Path, unit_file: Path, writable: list[Path], cmd: list[str]) -> list[str]:
    """The command line running ``cmd`` confined like ``unit_file`` asks."""
    unit = world_dir / f"sandboxed-{unit_file.name}"
    shutil.copy(unit_file, unit)
    rw = [arg for path in writable for arg in ("--rw", str(path))]
    sandbox = str(world_dir / "sandbox.py")
    return [
        "unshare", "--mount", "--propagation", "private", "--",
        SYSTEM_PYTHON, sandbox, "setup", "--unit", str(unit), *rw, "--", *cmd,
    ]  # fmt: skip


PROBE = """
import json, mmap, os, socket
def refused(f):
    try:
        f()
    except OSError as exc:
        return exc.errno
    return 0
print(json.dumps({
    "uid": os.getuid(),
    "write_root": refused(lambda: open("/remotellm-probe", "w")),
    "write_data": refused(lambda: open(os.environ["DATA"] + "/probe", "w").close()),
    "home": os.listdir("/root"),
    "netlink": refused(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)),
    "inet": refused(lambda: socket.socket().close()),
    "wx_memory": refused(lambda: mmap.mmap(-1, 4096, prot=7)),
    "setpriority": refused(lambda: os.setpriority(os.PRIO_PROCESS, 0, 5)),
    "umask": os.umask(0),
    "processes": len([p for p in os.listdir("/proc") if p.isdigit()]),
}))
"""


def test_sandbox_enforces_the_unit(world_dir: Path, wheel_venv: Path) -> None:
    """The emulation bites (or the test below would prove nothing)."""
    data = world_dir / "probe-data"
    data.mkdir(mode=0o700)
    shutil.chown(data, 65534, 65534)
    probe = [str(wheel_venv / "bin" / "python"), "-c", PROBE]
    cmd = sandboxed(world_dir, UNITS["broker"], [data], probe)
    result = run(cmd, env=base_env(DATA=str(data)))
    seen = json.loads(result.stdout)
    assert seen == {
        "uid": 65534,
        "write_root": 30,  # EROFS: ProtectSystem=strict
        "write_data": 0,  # ReadWritePaths
        "home": [],  # ProtectHome
        "netlink": 97,  # EAFNOSUPPORT: RestrictAddressFamilies
        "inet": 0,
        "wx_memory": 1,  # EPERM: MemoryDenyWriteExecute
        "setpriority": 1,  # EPERM: SystemCallFilter=~@resources
        "umask": 0o077,
        "processes": 1,  # ProtectProc=invisible
    }


def test_broker_runs_confined_like_its_unit(world_dir: Path, wheel_venv: Path) -> None:
    data = world_dir / "broker-data"
    data.mkdir(mode=0o700)
    shutil.chown(data, 65534, 65534)
    port, health = free_ports(2)
    cmd = sandboxed(
        world_dir,
        UNITS["broker"],
        [data],
        [
            str(wheel_venv / "bin" / "remotellm-broker"),
            *("--port", str(port), "--health-port", str(health)),
            *("--data-dir", str(data), "--host", "127.0.0.1"),
        ],
    )
    broker = start("broker", cmd, world_dir / "logs-confined", base_env(PYTHONUNBUFFERED="1"))
    with running([broker]):
        wait_for("/ready", lambda: http_status(f"http://127.0.0.1:{health}/ready") == 200, [broker])
        key = wait_for("banner", lambda: BANNER_KEY.search(broker.stdout()), [broker]).group(1)
        auth = {"Authorization": f"Bearer {key}"}
        response = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=auth, timeout=5)
        assert response.status_code == 200, response.text
        assert (data / "credentials.yaml").stat().st_uid == 65534
    assert broker.popen.returncode == 0, broker.output()
