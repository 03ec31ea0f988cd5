"""deploy/compose/scale-out.yaml and its nginx config: checked as files, and the nginx
config run for real (Debian's nginx) in front of two brokers sharing a redis-server, with a
connector and the openai SDK going through it."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import openai
import yaml

from broker.settings import BrokerSettings
from connector.settings import ConnectorSettings
from shared.bench.upstream import FakeLLM
from tests.deploy.helpers import env_names
from tests.scaleout.fixtures import COMPOSE, nginx_in_front
from tests.support.redis_server import RedisServer, unique_prefix
from tests.support.stack import USER_KEY, start_broker, start_connector


def test_compose_file_runs_two_brokers_on_one_redis_behind_nginx() -> None:
    compose = yaml.safe_load((COMPOSE / "scale-out.yaml").read_text())
    services = compose["services"]
    assert {"redis", "broker-a", "broker-b", "nginx", "connector", "ollama"} <= set(services)
    brokers = [services["broker-a"], services["broker-b"]]
    for broker in brokers:
        env = broker["environment"]
        for name in env:
            assert name in env_names(BrokerSettings), f"no broker setting {name}"
        assert env["REMOTELLM_BROKER_REDIS_URL"] == "redis://redis:6379/0"
        assert broker["depends_on"]["redis"]["condition"] == "service_healthy"
        assert (COMPOSE / broker["build"]["context"] / broker["build"]["dockerfile"]).is_file()
    # Each broker has its own data volume (usage database), both mount the shared one.
    data = [b["volumes"][0].split(":")[0] for b in brokers]
    assert len(set(data)) == 2
    assert all(b["volumes"][1].startswith("shared:") for b in brokers)
    connector = services["connector"]["environment"]
    for name in connector:
        assert name in env_names(ConnectorSettings), f"no connector setting {name}"
    assert connector["REMOTELLM_BROKER_URL"] == "http://nginx:8443"
    mount = services["nginx"]["volumes"][0].split(":")
    assert (COMPOSE / mount[0]).resolve() == (COMPOSE / "nginx-scale-out.conf").resolve()
    upstreams = re.findall(r"server (broker-[ab]):(\d+)", (COMPOSE / mount[0]).read_text())
    assert sorted({h for h, _ in upstreams}) == ["broker-a", "broker-b"]
    default_port = str(BrokerSettings.model_fields["port"].default)
    assert {p for _, p in upstreams} == {default_port}
    # The portal keeps a browser on one broker: its one-time key display and OAuth state
    # live in the broker that made them.
    site = (COMPOSE / mount[0]).read_text()
    assert re.search(r"upstream remotellm_portal \{\s*ip_hash;", site)
    assert re.search(r"location /portal/ \{\s*proxy_pass http://remotellm_portal;", site)


async def test_shipped_nginx_config_in_front_of_two_brokers(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    async with RedisServer() as redis:
        shared = {"redis_url": redis.url, "redis_prefix": unique_prefix()}
        a = await start_broker(tmp_path / "a", **shared)
        b = await start_broker(tmp_path / "b", **shared)
        nginx = nginx_in_front([a.settings.port, b.settings.port])
        conn = None
        try:
            conn = await start_connector(nginx.url, fake_llm.url, upload_mode="auto")
            fake_llm.chunk_delay = 0.005
            async with openai.AsyncOpenAI(
                base_url=nginx.url + "/v1", api_key=USER_KEY, max_retries=0
            ) as sdk:

                async def one() -> str:
                    stream = await sdk.chat.completions.create(
                        model="fake-model",
                        messages=[{"role": "user", "content": "hi"}],
                        max_tokens=30,
                        stream=True,
                    )
                    return "".join(
                        [c.choices[0].delta.content or "" async for c in stream if c.choices]
                    )

                results = await asyncio.gather(*(one() for _ in range(8)))
            assert results == ["".join(f"tok{i} " for i in range(30))] * 8
            hits = nginx.log("access.log")
            # Every request (and the connector's polls and uploads) went through nginx.
            assert hits.count("POST /v1/chat/completions") == 8
        finally:
            if conn is not None:
                await conn.stop()
            nginx.stop()
            await a.stop()
            await b.stop()
