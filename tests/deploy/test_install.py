"""The install scripts, run for real into a throwaway root (REMOTELLM_ROOT) with recording
fakes of systemctl, useradd, chown, launchctl and dscl first on PATH.

The tests of each script share one root and run in order: install, run again, use what
was installed, uninstall.
"""

from __future__ import annotations

import re
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.accounts.keys import KeyStore
from broker.settings import BrokerSettings
from connector.settings import ConnectorSettings
from shared.bench.upstream import FakeLLM
from shared.settings import load_settings
from tests.deploy.conftest import Fakes, make_fakes
from tests.deploy.helpers import (
    DEPLOY,
    SYSTEM_PYTHON,
    base_env,
    chat_stream,
    http_status,
    models_ready,
    parse_env_file,
    run,
    running,
    snapshot,
    start,
    unit_environment,
    wait_for,
)
from tests.deploy.test_systemd import sandboxed, with_exec_start
from tests.support.net import free_ports

NOBODY = 65534
KEY = re.compile(r"^sk-[0-9a-f]{32}$")
TOKEN = re.compile(r"^ct-[0-9a-f]{48}$")


@dataclass
class Install:
    root: Path
    fakes: Fakes
    script: Path
    first: subprocess.CompletedProcess[str]
    broker_credentials: tuple[str, str] = ("", "")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        self.fakes.clear()
        return run(["bash", self.script, *args], env=self.fakes.env(self.root), check=check)

    def path(self, path: str) -> Path:
        return self.root / path.lstrip("/")


def mode(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


KEY_LINE = re.compile(r"^    API key for users:  (sk-[0-9a-f]{32})$", re.M)
TOKEN_LINE = re.compile(r"^    Connector token:    (ct-[0-9a-f]{48})$", re.M)


def printed_credentials(result: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    """The key and token the broker made at install time: shown once, on stdout only."""
    key, token = KEY_LINE.search(result.stdout), TOKEN_LINE.search(result.stdout)
    assert key and token, result.stdout
    for secret in (key.group(1), token.group(1)):
        assert secret not in result.stderr
    assert result.stdout.count(key.group(1)) == 1
    # The token line, and the connector command in its environment form.
    assert result.stdout.count(token.group(1)) == 2
    assert f"REMOTELLM_BROKER_TOKEN={token.group(1)} uv run remotellm-connector" in result.stdout
    return key.group(1), token.group(1)


def assert_stored_hashed(data_dir: Path, key: str, token: str) -> None:
    """credentials.yaml in the data dir holds only hashes, owned by the service user."""
    credentials = data_dir / "credentials.yaml"
    assert mode(credentials) == (0o600, NOBODY, NOBODY)
    text = credentials.read_text()
    assert key not in text and token not in text
    keys = KeyStore(
        static_user_keys=[], static_connector_tokens=[], connector_config=None, data_dir=data_dir
    )
    assert keys.user(key) is not None and keys.connector(token) is not None


def assert_no_secret_in(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text


# --- Linux -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def linux(world_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Install:
    # In world_dir: the installed services are later run as nobody, who must reach them.
    root = world_dir / "linux-root"
    fakes = make_fakes(tmp_path_factory.mktemp("linux-fakes"))
    script = DEPLOY / "install-linux.sh"
    fakes.clear()
    first = run(
        ["bash", script, "--broker", "--connector", "--python", SYSTEM_PYTHON],
        env=fakes.env(root),
    )
    return Install(root, fakes, script, first)


def test_linux_install(linux: Install) -> None:
    p = linux.path
    calls = linux.fakes.calls()
    assert [c for c in calls if c.startswith("useradd")] == [
        "useradd --system --user-group --home-dir /var/lib/remotellm --no-create-home "
        "--shell /usr/sbin/nologin --comment RemoteLLM service remotellm"
    ]
    # Program: a venv whose entry points run.
    for program in ("remotellm-broker", "remotellm-connector"):
        exe = p(f"/opt/remotellm/venv/bin/{program}")
        assert run([exe, "--version"]).returncode == 0
    assert list(p("/opt/remotellm/dist").glob("remotellm-*.whl"))

    # Ownership and modes (the service user is played by nobody).
    assert mode(p("/etc/remotellm")) == (0o750, 0, NOBODY)
    assert mode(p("/var/lib/remotellm")) == (0o750, 0, NOBODY)
    assert mode(p("/var/lib/remotellm/broker")) == (0o700, NOBODY, NOBODY)
    for name in ("broker.env", "connector.env", "connectors.yaml"):
        assert mode(p(f"/etc/remotellm/{name}")) == (0o640, 0, NOBODY), name
    for name in ("remotellm-broker.service", "remotellm-connector.service"):
        unit = p(f"/etc/systemd/system/{name}")
        assert unit.read_text() == (DEPLOY / "systemd" / name).read_text()
        assert mode(unit) == (0o644, 0, 0)

    # Fresh credentials, made by the broker into its data dir (hashed), shown once; no
    # secret in broker.env; the connector installed alongside has its token.
    key, token = printed_credentials(linux.first)
    assert KEY.match(key) and TOKEN.match(token)
    assert_stored_hashed(p("/var/lib/remotellm/broker"), key, token)
    broker_text = p("/etc/remotellm/broker.env").read_text()
    assert_no_secret_in(broker_text, key, token)
    assert parse_env_file(p("/etc/remotellm/broker.env")) == {}
    connector_env = parse_env_file(p("/etc/remotellm/connector.env"))
    assert connector_env == {
        "REMOTELLM_BROKER_URL": "http://127.0.0.1:8443",
        "REMOTELLM_BROKER_TOKEN": token,
    }
    assert not any(key in c or token in c for c in calls)

    # systemd told to load, enable and (re)start both.
    systemctl = [c for c in calls if c.startswith("systemctl")]
    assert systemctl == [
        "systemctl daemon-reload",
        "systemctl enable --quiet remotellm-broker.service",
        "systemctl restart remotellm-broker.service",
        "systemctl enable --quiet remotellm-connector.service",
        "systemctl restart remotellm-connector.service",
    ]


def test_linux_second_run_changes_nothing(linux: Install) -> None:
    # The operator has edited the configuration meanwhile.
    env_file = linux.path("/etc/remotellm/broker.env")
    env_file.write_text(env_file.read_text() + "REMOTELLM_BROKER_LOG_LEVEL=debug\n")
    before = snapshot(linux.root)
    result = linux.run("--broker", "--connector", "--python", SYSTEM_PYTHON)
    after = snapshot(linux.root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert changed == []
    assert "REMOTELLM_BROKER_LOG_LEVEL=debug" in env_file.read_text()
    assert "Nothing changed" in result.stdout
    assert not KEY_LINE.search(result.stdout) and not TOKEN_LINE.search(result.stdout)
    calls = linux.fakes.calls()
    assert not [c for c in calls if c.startswith("useradd")]
    # Enabled and running (start does nothing to a running service), not restarted.
    assert [c for c in calls if c.startswith("systemctl")] == [
        "systemctl enable --quiet remotellm-broker.service",
        "systemctl start remotellm-broker.service",
        "systemctl enable --quiet remotellm-connector.service",
        "systemctl start remotellm-connector.service",
    ]


@pytest.mark.parametrize("component", ["broker", "connector"])
def test_linux_installed_units_verify(linux: Install, component: str, tmp_path: Path) -> None:
    unit = linux.path(f"/etc/systemd/system/remotellm-{component}.service")
    exe = linux.path(f"/opt/remotellm/venv/bin/remotellm-{component}")
    result = run(["systemd-analyze", "verify", "--man=no", with_exec_start(unit, tmp_path, exe)])
    assert result.stderr.strip() == ""


def test_linux_installed_services_relay_confined(
    linux: Install, fake_llm: FakeLLM, world_dir: Path
) -> None:
    """The installed programs, configured by the installed files, confined like their
    units, as the service user: a streamed chat completion goes through."""
    p = linux.path
    port, health = free_ports(2)
    broker_unit = p("/etc/systemd/system/remotellm-broker.service")
    connector_unit = p("/etc/systemd/system/remotellm-connector.service")
    # What systemd would pass: Environment= overridden by EnvironmentFile=.
    broker_env = {
        **unit_environment(broker_unit),
        **parse_env_file(p("/etc/remotellm/broker.env")),
    }
    connector_env = {
        **unit_environment(connector_unit),
        **parse_env_file(p("/etc/remotellm/connector.env")),
    }
    # Paths that the unit names on the real system are inside the root here.
    data_dir = p(broker_env["REMOTELLM_BROKER_DATA_DIR"])
    broker_cmd = [
        str(p("/opt/remotellm/venv/bin/remotellm-broker")),
        "--port", str(port), "--health-port", str(health),
        "--data-dir", str(data_dir),
        "--connector-config", str(p(broker_env["REMOTELLM_BROKER_CONNECTOR_CONFIG"])),
    ]  # fmt: skip
    connector_cmd = [
        str(p("/opt/remotellm/venv/bin/remotellm-connector")),
        "--broker-url", f"http://127.0.0.1:{port}", "--llm-url", fake_llm.url,
    ]  # fmt: skip
    logs = world_dir / "logs-installed"
    broker = start(
        "broker",
        sandboxed(world_dir, broker_unit, [data_dir], broker_cmd),
        logs,
        base_env(**broker_env),
    )
    procs = [broker]
    with running(procs):
        wait_for("/ready", lambda: http_status(f"http://127.0.0.1:{health}/ready") == 200, procs)
        connector = start(
            "connector",
            sandboxed(world_dir, connector_unit, [], connector_cmd),
            logs,
            base_env(**connector_env),
        )
        procs.append(connector)
        key, _ = printed_credentials(linux.first)
        base = f"http://127.0.0.1:{port}"
        wait_for("the model", lambda: models_ready(base, key, fake_llm.model), procs)
        text, _ = chat_stream(base, key, fake_llm.model)
        assert text == fake_llm.answer
        # The credentials came from the data dir: nothing generated, nothing printed.
        assert "API key for users" not in broker.stdout()
        assert key not in broker.output() and connector_env["REMOTELLM_BROKER_TOKEN"] not in (
            connector.output()
        )
    assert broker.popen.returncode == 0, broker.output()
    assert connector.popen.returncode == 0, connector.output()


def test_linux_uninstall(linux: Install) -> None:
    p = linux.path
    result = linux.run("--uninstall")
    calls = linux.fakes.calls()
    assert "systemctl disable --now --quiet remotellm-broker.service" in calls
    assert "systemctl disable --now --quiet remotellm-connector.service" in calls
    assert "systemctl daemon-reload" in calls
    assert not p("/etc/systemd/system/remotellm-broker.service").exists()
    assert not p("/opt/remotellm").exists()
    # Configuration and data stay unless purged.
    assert p("/etc/remotellm/broker.env").exists()
    assert p("/var/lib/remotellm/broker").is_dir()
    assert "--purge" in result.stdout

    linux.run("--uninstall", "--purge")
    assert not p("/etc/remotellm").exists()
    assert not p("/var/lib/remotellm").exists()
    assert "userdel remotellm" in linux.fakes.calls()
    leftovers = [q for q in linux.root.rglob("*") if not q.is_dir()]
    assert leftovers == []


# --- macOS -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def macos(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Install:
    base = tmp_path_factory.mktemp("macos")
    fakes = make_fakes(base)
    script = DEPLOY / "install-macos.sh"
    install = Install(base / "root", fakes, script, subprocess.CompletedProcess([], 0, "", ""))
    install.first = install.run("--connector", "--prefix", "/opt/rllm", "--wheel", str(wheel))
    return install


def macos_args(wheel: Path, *components: str) -> list[str]:
    return [*components, "--prefix", "/opt/rllm", "--wheel", str(wheel)]


def test_macos_install_connector(macos: Install) -> None:
    p = macos.path
    calls = macos.fakes.calls()
    # A hidden system user with the first id free for both users and groups.
    assert "dscl . -create /Users/_remotellm UniqueID 302" in calls
    assert "dscl . -create /Groups/_remotellm PrimaryGroupID 302" in calls
    plist = p("/Library/LaunchDaemons/com.remotellm.connector.plist")
    text = plist.read_text()
    assert "<string>/opt/rllm/venv/bin/remotellm-connector</string>" in text
    assert "/usr/local/remotellm" not in text
    assert run([p("/opt/rllm/venv/bin/remotellm-connector"), "--version"]).returncode == 0
    assert mode(p("/usr/local/etc/remotellm/connector.yaml")) == (0o640, 0, NOBODY)
    assert mode(p("/usr/local/var/log/remotellm/connector.log")) == (0o640, NOBODY, NOBODY)
    # Not configured yet: not loaded, and told what to do.
    assert not [c for c in calls if c.startswith("launchctl bootstrap")]
    assert "set broker_url and broker_token" in macos.first.stdout


def test_macos_second_run_changes_nothing(macos: Install, wheel: Path) -> None:
    before = snapshot(macos.root)
    result = macos.run(*macos_args(wheel, "--connector"))
    assert snapshot(macos.root) == before
    assert "Nothing changed" in result.stdout
    assert not [c for c in macos.fakes.calls() if " -create " in c or "bootstrap" in c]


def test_macos_add_broker(macos: Install, wheel: Path) -> None:
    p = macos.path
    connector_yaml = p("/usr/local/etc/remotellm/connector.yaml")
    kept = connector_yaml.read_text()
    result = macos.run(*macos_args(wheel, "--broker", "--connector"))
    assert connector_yaml.read_text() == kept, "an existing config was overwritten"

    config = p("/usr/local/etc/remotellm/broker.yaml")
    settings = load_settings(BrokerSettings, config, {})
    assert settings.user_api_keys == [] and settings.connector_tokens == []
    assert str(settings.data_dir) == "/usr/local/var/remotellm/broker"
    assert str(settings.connector_config) == "/usr/local/etc/remotellm/connectors.yaml"
    key, token = printed_credentials(result)
    assert_stored_hashed(p("/usr/local/var/remotellm/broker"), key, token)
    assert_no_secret_in(config.read_text(), key, token)
    macos.broker_credentials = (key, token)
    calls = macos.fakes.calls()
    assert "launchctl bootstrap system /Library/LaunchDaemons/com.remotellm.broker.plist" in calls
    assert not [c for c in calls if "com.remotellm.connector" in c]


def test_macos_configured_connector_starts(macos: Install, wheel: Path) -> None:
    p = macos.path
    connector_yaml = p("/usr/local/etc/remotellm/connector.yaml")
    _, token = macos.broker_credentials
    text = connector_yaml.read_text()
    text = text.replace("#broker_url:", "broker_url: http://127.0.0.1:8443", 1)
    text = text.replace("#broker_token:", f"broker_token: {token}", 1)
    connector_yaml.write_text(text)
    settings = load_settings(ConnectorSettings, connector_yaml, {})
    assert settings.broker_url == "http://127.0.0.1:8443"

    macos.run(*macos_args(wheel, "--broker", "--connector"))
    calls = macos.fakes.calls()
    assert "launchctl enable system/com.remotellm.connector" in calls
    assert (
        "launchctl bootstrap system /Library/LaunchDaemons/com.remotellm.connector.plist" in calls
    )
    assert not [c for c in calls if "com.remotellm.broker" in c and "print" not in c]


def test_macos_uninstall_purge(macos: Install) -> None:
    macos.run("--uninstall", "--purge", "--prefix", "/opt/rllm")
    calls = macos.fakes.calls()
    assert "launchctl bootout system/com.remotellm.broker" in calls
    assert "launchctl bootout system/com.remotellm.connector" in calls
    assert "dscl . -delete /Users/_remotellm" in calls
    leftovers = [q for q in macos.root.rglob("*") if not q.is_dir()]
    assert leftovers == []
