"""The launchd plists parse and start the installed programs the way the macOS install
script lays them out."""

from __future__ import annotations

import plistlib
import re
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from broker.settings import BrokerSettings
from connector.settings import ConnectorSettings
from tests.deploy.helpers import DEPLOY, entry_points

PLISTS = {
    "broker": DEPLOY / "launchd" / "com.remotellm.broker.plist",
    "connector": DEPLOY / "launchd" / "com.remotellm.connector.plist",
}
SETTINGS: dict[str, type[BaseSettings]] = {"broker": BrokerSettings, "connector": ConnectorSettings}


def script_var(name: str) -> str:
    text = (DEPLOY / "install-macos.sh").read_text()
    found = re.search(rf"^{name}=(\S+)$", text, flags=re.M)
    assert found, name
    return found.group(1)


@pytest.mark.parametrize("component", sorted(PLISTS))
def test_plist(component: str) -> None:
    with PLISTS[component].open("rb") as fh:
        plist = plistlib.load(fh)
    prefix, conf_dir = script_var("DEFAULT_PREFIX"), script_var("CONF_DIR")
    log_dir, user = script_var("LOG_DIR"), script_var("SERVICE_USER")
    drain = SETTINGS[component].model_fields["drain_timeout"].default

    assert plist["Label"] == f"com.remotellm.{component}"
    program, *args = plist["ProgramArguments"]
    assert program == f"{prefix}/venv/bin/remotellm-{component}"
    assert Path(program).name in entry_points()
    assert args == ["--config", f"{conf_dir}/{component}.yaml"]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] is True
    assert plist["ThrottleInterval"] <= 5
    assert plist["ExitTimeOut"] > drain, "launchd would SIGKILL a draining service"
    assert plist["UserName"] == plist["GroupName"] == user
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == f"{log_dir}/{component}.log"
    env = plist["EnvironmentVariables"]
    assert env["PYTHONUNBUFFERED"] == "1"
    # The plist is world-readable: settings (and secrets) live in the YAML file.
    assert not any(name.startswith("REMOTELLM_") for name in env)
