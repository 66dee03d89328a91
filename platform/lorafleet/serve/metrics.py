"""Prometheus metrics of the server, scraped at ``GET /metrics`` on the app's HTTP port.

Every request passes through the ingress, so the ingress counts requests, tokens, latency
and time to first token per model (the base's name or the adapter's). Adapter loads and
evictions happen inside each engine replica's vLLM; each response carries that replica's
cumulative counts, and the ingress reports the sum over the replicas it has heard from.

Metric names::

    lorafleet_requests_total{model, endpoint, status}
    lorafleet_prompt_tokens_total{model}         lorafleet_completion_tokens_total{model}
    lorafleet_request_latency_seconds{model, endpoint}   (histogram)
    lorafleet_time_to_first_token_seconds{model, endpoint} (histogram)
    lorafleet_requests_in_flight
    lorafleet_adapter_loads_total{adapter}       lorafleet_adapter_evictions_total{adapter}
    lorafleet_adapters_loaded{replica}

Who sees what: the admin key every series; a tenant's key the series of its own adapters
(``<tenant>/<adapter>``); no key the series of the shared models only. Point Prometheus at
``/metrics`` with the admin key as its bearer token.
"""

from __future__ import annotations

import threading
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class _AdapterActivity:
    """Collector summing the latest cumulative adapter counts each engine replica reported."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_replica: dict[str, dict] = {}

    def update(self, replica: str, activity: dict) -> None:
        with self._lock:
            self._by_replica[replica] = activity

    def collect(self):
        with self._lock:
            replicas = dict(self._by_replica)
        loads = CounterMetricFamily("lorafleet_adapter_loads", "Adapters loaded into a vLLM engine (summed over replicas).", labels=["adapter"])
        evictions = CounterMetricFamily("lorafleet_adapter_evictions", "Adapters evicted from a vLLM engine's LRU (summed over replicas).", labels=["adapter"])
        loaded = GaugeMetricFamily("lorafleet_adapters_loaded", "Adapters held by each engine replica at its last report.", labels=["replica"])
        for key, family in (("loads", loads), ("evictions", evictions)):
            totals: dict[str, int] = {}
            for activity in replicas.values():
                for name, count in activity.get(key, {}).items():
                    totals[name] = totals.get(name, 0) + count
            for name, count in sorted(totals.items()):
                family.add_metric([name], count)
        for replica, activity in sorted(replicas.items()):
            loaded.add_metric([replica], len(activity.get("loaded", [])))
        return [loads, evictions, loaded]


class ServeMetrics:
    """The ingress's metrics in a private registry (no clash with Ray's or vLLM's globals)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorafleet_requests", "Requests answered, by model, endpoint and HTTP status.", ["model", "endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("lorafleet_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.completion_tokens = Counter("lorafleet_completion_tokens", "Completion tokens generated.", ["model"], registry=r)
        self.latency = Histogram("lorafleet_request_latency_seconds", "Time from request arrival to the last byte.", ["model", "endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("lorafleet_time_to_first_token_seconds", "Time from request arrival to the first generated token.", ["model", "endpoint"], buckets=_TTFT_BUCKETS, registry=r)
        self.in_flight = Gauge("lorafleet_requests_in_flight", "Requests the ingress is handling now.", registry=r)
        self.adapters = _AdapterActivity()
        r.register(self.adapters)

    def observe(self, model: str, endpoint: str, status: int, latency_s: float, ttft_s: Optional[float] = None,
                usage: Optional[dict] = None) -> None:
        """Record one finished request (``model`` is "unknown" when the body named none that exists)."""
        self.requests.labels(model, endpoint, str(status)).inc()
        self.latency.labels(model, endpoint).observe(latency_s)
        if ttft_s is not None:
            self.ttft.labels(model, endpoint).observe(ttft_s)
        if usage:
            self.prompt_tokens.labels(model).inc(usage.get("prompt_tokens", 0))
            self.completion_tokens.labels(model).inc(usage.get("completion_tokens", 0))

    def render(self, tenant: Optional[str] = "") -> bytes:
        """The text exposition: every series (``tenant`` None), or only the series of one tenant's
        adapters (labels ``<tenant>/...``), or with ``""`` only those of the shared models."""
        if tenant is None:
            return generate_latest(self.registry)
        return generate_latest(_Scoped(self.registry, tenant))


class _Scoped:
    """A view of a registry with only the samples whose model/adapter labels belong to ``tenant``
    (``""``: the shared models, names without a tenant prefix). Series without such labels
    (in-flight gauge, per-replica counts) are the operator's and left out."""

    def __init__(self, registry: CollectorRegistry, tenant: str):
        self.registry, self.tenant = registry, tenant

    def _mine(self, labels: dict) -> bool:
        names = [labels[k] for k in ("model", "adapter") if k in labels]
        return bool(names) and all(n.startswith(f"{self.tenant}/") if self.tenant else "/" not in n for n in names)

    def collect(self):
        for family in self.registry.collect():  # fresh Metric objects on every collect
            family.samples = [s for s in family.samples if self._mine(s.labels)]
            if family.samples:
                yield family
