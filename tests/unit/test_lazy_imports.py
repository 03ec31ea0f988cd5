"""What a process loads follows its configuration (docs/performance.md, "A lighter process").

Each check builds the broker or the connector in a fresh interpreter, as the entry point
does, and reads ``sys.modules``: redis-py only with --redis-url, authlib and httpx only with
a GitLab application (the portal's pages still answer without one), cryptography in the
connector only to explain a failed TLS handshake. The counterparts show that the same
names do load when the setting is on, so the check cannot pass by checking the wrong name.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BROKER = """
import json, sys
from broker.server import BrokerServer
from broker.settings import BrokerSettings
settings = BrokerSettings(data_dir=sys.argv[1], port=0, health_port=0, **json.loads(sys.argv[2]))
BrokerServer(settings)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""

CONNECTOR = """
import json, sys
import connector.cli, connector.runner
from connector.settings import ConnectorSettings
from connector.tls import trust_for
trust_for(ConnectorSettings(broker_url="http://127.0.0.1:1", llm_url="http://127.0.0.1:2",
                            broker_token="ct-x", model=["m"]))
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def _loaded(code: str, *args: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_broker_with_default_settings_loads_neither_redis_nor_gitlab_clients(
    tmp_path: Path,
) -> None:
    loaded = _loaded(BROKER, str(tmp_path), "{}")
    assert {"quart", "hypercorn", "broker"} <= loaded
    assert not loaded & {"redis", "authlib", "httpx", "cryptography"}


def test_broker_loads_redis_with_a_redis_url_and_authlib_with_gitlab(tmp_path: Path) -> None:
    settings = {
        "redis_url": "redis://127.0.0.1:1/0",
        "gitlab_client_id": "app",
        "gitlab_client_secret": "secret",
        "gitlab_allow_any_user": True,
    }
    loaded = _loaded(BROKER, str(tmp_path), json.dumps(settings))
    assert {"redis", "httpx"} <= loaded


def test_connector_loads_no_cryptography_on_a_plain_path() -> None:
    loaded = _loaded(CONNECTOR)
    assert {"httpx", "aiohttp"} <= loaded
    assert not loaded & {"cryptography", "truststore", "quart", "redis"}
