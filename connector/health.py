"""The connector's own health server: ``/health`` (state), ``/ready`` (200 or 503) and
``/metrics`` (Prometheus text, ``connector.metrics``).

A few lines of asyncio rather than a web framework: three read-only GET routes on a
loopback port (by default) do not need more. The routes read the connector's ``Status``
(``connector.status``) and never change it: the question to the LLM behind ``llm.ok``
goes through ``ModelWatch.check_llm``, which records the answer as an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from prometheus_client import CONTENT_TYPE_LATEST

from connector.metrics import ConnectorMetrics
from connector.runner import Connector

LLM_CHECK_INTERVAL = 5.0


class HealthServer:
    def __init__(self, connector: Connector, host: str, port: int) -> None:
        self.connector = connector
        self.host = host
        self.port = port
        self.metrics = ConnectorMetrics(connector)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sockets = self._server.sockets
        if sockets:
            self.port = sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def snapshot(self) -> dict[str, object]:
        c = self.connector
        st = c.status
        relay_ok = st.session_id is not None and st.broker_error is None
        return {
            "status": "ok" if relay_ok and st.llm_ok else "degraded",
            "name": c.settings.name,
            "relay": {
                "broker_url": c.settings.broker_url,
                "connected": relay_ok,
                "session": st.session_id,
                "upload_mode": st.upload_mode,
                "poll_mode": st.poll_mode,
                "last_poll_age_s": round(time.monotonic() - st.last_poll_ok, 1)
                if st.last_poll_ok
                else None,
                "error": st.broker_error,
                "reconnects": st.reconnects,
            },
            "llm": {"url": c.settings.llm_url, "ok": st.llm_ok, "error": st.llm_error},
            "models": st.models,
            "capacity": st.capacity,
            "capacity_source": st.capacity_source,
            "in_flight": len(c.tasks),
            "served": st.served,
            "failed": st.failed,
        }

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            while (await asyncio.wait_for(reader.readline(), 5.0)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            content_type = "application/json"
            if path == "/metrics":
                status, payload = 200, self.metrics.render()
                content_type = CONTENT_TYPE_LATEST
            elif path in ("/health", "/ready"):
                await self.connector.models.check_llm(LLM_CHECK_INTERVAL)
                snap = self.snapshot()
                if path == "/health":
                    status, body = 200, snap
                else:
                    relay = snap["relay"]
                    ready = bool(isinstance(relay, dict) and relay["connected"]) and bool(
                        self.connector.status.llm_ok
                    )
                    status, body = (200 if ready else 503), {"ready": ready}
                payload = json.dumps(body).encode()
            else:
                status, payload = 404, json.dumps({"error": "not found"}).encode()
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
