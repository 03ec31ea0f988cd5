"""Prometheus metrics for the broker, served at ``/metrics`` on the health port.

Counters and histograms are updated once per request at its end (never per chunk); gauges
that mirror relay state come from a snapshot of the relay state taken for each scrape.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from broker.state.relay import RelayView

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# A client can name any model: requests for unknown ones share this label.
UNKNOWN_MODEL_LABEL = "(unknown)"
W = TypeVar("W", bound=MetricWrapperBase)


class _RelayCollector(Collector):
    def __init__(self) -> None:
        self.view = RelayView()

    def collect(self) -> Iterable[Metric]:
        d = self.view
        connectors = GaugeMetricFamily(
            "remotellm_connectors", "Live connector sessions", labels=["upload_mode"]
        )
        modes: dict[str, int] = {}
        for session in d.sessions.values():
            modes[session.upload_mode.value] = modes.get(session.upload_mode.value, 0) + 1
        for mode, count in sorted(modes.items()):
            connectors.add_metric([mode], count)
        yield connectors
        queue = GaugeMetricFamily(
            "remotellm_queue_depth", "Requests waiting for a connector", labels=["model"]
        )
        for model, depth in sorted(d.queue_depth.items()):
            queue.add_metric([model], depth)
        yield queue
        yield GaugeMetricFamily(
            "remotellm_in_flight", "Requests queued or being relayed", value=d.in_flight
        )
        models = GaugeMetricFamily(
            "remotellm_model_connectors", "Live connectors serving each model", labels=["model"]
        )
        for model, owners in sorted(d.live_models.items()):
            models.add_metric([model], len(owners))
        yield models
        waits = CounterMetricFamily(
            "remotellm_slot_waits",
            "Requests that had to queue because every connector slot for the model was busy",
            labels=["model"],
        )
        for model, count in sorted(d.slot_waits.items()):
            waits.add_metric([model], count)
        yield waits


class BrokerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "remotellm_requests",
            "Relayed API requests by model and final status",
            ["model", "status"],
            registry=self.registry,
        )
        self.ttfb = Histogram(
            "remotellm_time_to_first_byte_seconds",
            "Time from request to the first response byte sent to the API user",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "remotellm_request_duration_seconds",
            "Time from request to the end of its response",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registrations = Counter(
            "remotellm_connector_registrations",
            "Connector registrations (first connects and reconnects)",
            registry=self.registry,
        )
        self.redispatches = Counter(
            "remotellm_redispatches",
            "Requests handed to another connector after their lease expired",
            registry=self.registry,
        )
        self.tokens = Counter(
            "remotellm_tokens",
            "Tokens of finished requests by model and kind (input, output); exact where the "
            "upstream reported usage, else the broker's estimate (docs/usage.md)",
            ["model", "kind"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "remotellm_queue_wait_seconds",
            "Time from a request's arrival to its hand-out to the connector that served it",
            ["model"],
            buckets=_QUEUE_BUCKETS,
            registry=self.registry,
        )
        self.rate_limited_requests = Counter(
            "remotellm_rate_limited",
            "API requests refused with 429 by a limit (rpm, tpm, concurrency, daily, monthly)",
            ["reason"],
            registry=self.registry,
        )
        self.alias_requests = Counter(
            "remotellm_alias_requests",
            "API requests that named an alias, by the model that served them, the alias and "
            "final status (docs/aliases.md)",
            ["model", "alias", "status"],
            registry=self.registry,
        )
        self._seen_redispatches = 0
        # Model -> the labelled series recorded for it: a forgotten model's are removed.
        self._series: dict[str, set[tuple[MetricWrapperBase, tuple[str, ...]]]] = {}
        self._relay = _RelayCollector()
        self.registry.register(self._relay)

    def request_done(
        self, model: str, status: int, ttfb_s: float | None, duration_s: float
    ) -> None:
        self._label(self.requests, model, str(status)).inc()
        if ttfb_s is not None:
            self._label(self.ttfb, model).observe(ttfb_s)
        self._label(self.duration, model).observe(duration_s)

    def usage_done(
        self,
        model: str,
        tokens_in: int | None,
        tokens_out: int | None,
        queue_wait_s: float | None,
    ) -> None:
        """Once per relayed request at its end: its tokens and how long it queued."""
        if tokens_in:
            self._label(self.tokens, model, "input").inc(tokens_in)
        if tokens_out:
            self._label(self.tokens, model, "output").inc(tokens_out)
        if queue_wait_s is not None:
            self._label(self.queue_wait, model).observe(queue_wait_s)

    def alias_done(self, model: str, alias: str, status: int) -> None:
        """A request that named ``alias`` ended, served by ``model`` (a target's model)."""
        self._label(self.alias_requests, model, alias, str(status)).inc()

    def rate_limited(self, reason: str) -> None:
        self.rate_limited_requests.labels(reason).inc()

    def _label(self, metric: W, model: str, *rest: str) -> W:
        values = (model, *rest)
        self._series.setdefault(model, set()).add((metric, values))
        return metric.labels(*values)

    def prune(self, known: frozenset[str]) -> None:
        """Drop the series of models the relay state forgot (--model-grace after the last
        session serving them), so /metrics stays as small as the set of known models."""
        for model in [m for m in self._series if m not in known and m != UNKNOWN_MODEL_LABEL]:
            for metric, values in self._series.pop(model):
                metric.remove(*values)

    def render(self, view: RelayView, aliases: frozenset[str] = frozenset()) -> bytes:
        """``aliases``: names whose series stay (a refused alias request is labelled so)."""
        self.prune(view.known_models | aliases)
        self._relay.view = view
        total = view.redispatched
        if total > self._seen_redispatches:
            self.redispatches.inc(total - self._seen_redispatches)
            self._seen_redispatches = total
        return generate_latest(self.registry)
