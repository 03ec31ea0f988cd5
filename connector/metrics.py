"""Prometheus metrics of the connector, served at ``/metrics`` on its health port.

Everything is read from the connector's own counters when scraped: nothing is updated per
chunk, and a connector nobody scrapes pays nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from connector.runner import Connector


class _ConnectorCollector(Collector):
    def __init__(self, connector: Connector) -> None:
        self.connector = connector

    def collect(self) -> Iterable[Metric]:
        c = self.connector
        st = c.status
        yield CounterMetricFamily(
            "remotellm_connector_relay_reconnects",
            "Times the relay session to the broker was lost and set up again",
            value=st.reconnects,
        )
        yield GaugeMetricFamily(
            "remotellm_connector_connected",
            "1 while the connector has a session with the broker",
            value=1 if st.session_id is not None and st.broker_error is None else 0,
        )
        yield GaugeMetricFamily(
            "remotellm_connector_in_flight", "Requests being served now", value=len(c.tasks)
        )
        yield GaugeMetricFamily(
            "remotellm_connector_capacity", "Concurrent requests offered", value=st.capacity
        )
        requests = CounterMetricFamily(
            "remotellm_connector_requests",
            "Requests finished, by result (served: uploaded to the broker)",
            labels=["result"],
        )
        requests.add_metric(["served"], st.served)
        requests.add_metric(["failed"], st.failed)
        yield requests
        errors = CounterMetricFamily(
            "remotellm_connector_upstream_errors",
            "Requests the local LLM failed, by reason (unreachable, timeout, a 5xx status...)",
            labels=["reason"],
        )
        for reason, count in sorted(c.upstream.errors.items()):
            errors.add_metric([reason], count)
        yield errors


class ConnectorMetrics:
    def __init__(self, connector: Connector) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_ConnectorCollector(connector))

    def render(self) -> bytes:
        return generate_latest(self.registry)
