"""Prometheus metrics of the server, scraped at ``GET /metrics`` on the app's HTTP port.

Each server replica counts the requests it answered: requests, tokens, latency, and time to
first token of streamed requests, per model (the base's name or the adapter's), plus the
adapter loads and evictions its vLLM engine made. A scrape lands on one replica, so every
replica publishes a snapshot of its counts with its registry state on each sync tick, and
``/metrics`` answers the sum over the live replicas (its own counts read live): whichever
replica answers, the counters are the app's.

Metric names::

    lorafleet_requests_total{model, endpoint, status}
    lorafleet_prompt_tokens_total{model}         lorafleet_completion_tokens_total{model}
    lorafleet_request_latency_seconds{model, endpoint}   (histogram)
    lorafleet_time_to_first_token_seconds{model, endpoint} (histogram)
    lorafleet_requests_in_flight
    lorafleet_adapter_loads_total{adapter}       lorafleet_adapter_evictions_total{adapter}
    lorafleet_adapters_loaded{replica}

Time to first token is known for streamed requests (a non-streamed response arrives whole).

Who sees what: the admin key every series; a tenant's key the series of its own adapters
(``<tenant>/<adapter>``); no key the series of the shared models only. Point Prometheus at
``/metrics`` with the admin key as its bearer token.
"""

from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


def _activity_families(activities: list[tuple[str, dict]]):
    """Adapter loads/evictions summed over replicas, and what each replica holds."""
    loads = CounterMetricFamily("lorafleet_adapter_loads", "Adapters loaded into a vLLM engine (summed over replicas).", labels=["adapter"])
    evictions = CounterMetricFamily("lorafleet_adapter_evictions", "Adapters evicted from a vLLM engine's LRU (summed over replicas).", labels=["adapter"])
    loaded = GaugeMetricFamily("lorafleet_adapters_loaded", "Adapters held by each engine replica at its last report.", labels=["replica"])
    for key, family in (("loads", loads), ("evictions", evictions)):
        totals: dict[str, int] = {}
        for _, activity in activities:
            for name, count in activity.get(key, {}).items():
                totals[name] = totals.get(name, 0) + count
        for name, count in sorted(totals.items()):
            family.add_metric([name], count)
    for replica, activity in sorted(activities):
        loaded.add_metric([replica], len(activity.get("loaded", [])))
    return [loads, evictions, loaded]


def _vllm_families() -> list:
    """vLLM's metric families in this process (empty where no engine runs)."""
    from prometheus_client import REGISTRY

    return [f for f in REGISTRY.collect() if f.name.startswith("vllm:")]


class _Merged:
    """A collector over several replicas' snapshots: each series summed (families as this process defines them)."""

    def __init__(self, registry: CollectorRegistry, snapshots: list[dict]):
        self.registry, self.snapshots = registry, snapshots

    def collect(self):
        totals: dict[tuple, float] = {}
        for snap in self.snapshots:
            for family, sample, labels, value in snap.get("samples", []):
                key = (family, sample, tuple(sorted(labels.items())))
                totals[key] = totals.get(key, 0.0) + value
        for template in [*self.registry.collect(), *_vllm_families()]:
            family = Metric(template.name, template.documentation, template.type, template.unit)
            for (name, sample, labels), value in sorted(totals.items()):
                if name == template.name:
                    family.add_sample(sample, dict(labels), value)
            yield family
        yield from _activity_families([(s.get("replica", "?"), s.get("activity", {})) for s in self.snapshots])


class ServeMetrics:
    """One replica's metrics in a private registry (no clash with Ray's or vLLM's globals)."""

    def __init__(self, replica: str = "local"):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorafleet_requests", "Requests answered, by model, endpoint and HTTP status.", ["model", "endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("lorafleet_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.completion_tokens = Counter("lorafleet_completion_tokens", "Completion tokens generated.", ["model"], registry=r)
        self.latency = Histogram("lorafleet_request_latency_seconds", "Time from request arrival to the last byte.", ["model", "endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("lorafleet_time_to_first_token_seconds", "Time from request arrival to the first generated token.", ["model", "endpoint"], buckets=_TTFT_BUCKETS, registry=r)
        self.in_flight = Gauge("lorafleet_requests_in_flight", "Requests the server replicas are handling now.", registry=r)
        self.replica = replica

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

    def snapshot(self, activity: dict) -> dict:
        """This replica's counts as plain data (published to the registry; see the module docstring).

        vLLM's own engine series (``vllm:*``, from the process-wide registry its stat logger fills)
        come along with a ``replica`` label: a gauge such as KV-cache usage is per engine, so they
        are shown per replica for Prometheus to aggregate, not summed here.
        """
        samples = [[family.name, sample.name, dict(sample.labels), sample.value]
                   for family in self.registry.collect() for sample in family.samples if not sample.name.endswith("_created")]
        for family in _vllm_families():
            samples += [[family.name, sample.name, {**sample.labels, "replica": self.replica}, sample.value]
                        for sample in family.samples if not sample.name.endswith("_created")]
        return {"replica": self.replica, "samples": samples, "activity": activity}

    def render(self, tenant: Optional[str], snapshots: list[dict]) -> bytes:
        """The text exposition of ``snapshots`` summed: every series (``tenant`` None), or only the series
        of one tenant's adapters (labels ``<tenant>/...``), or with ``""`` only those of the shared models."""
        merged = _Merged(self.registry, snapshots)
        if tenant is None:
            return generate_latest(merged)
        return generate_latest(_Scoped(merged, tenant))


class _Scoped:
    """A view of a registry with only the samples whose model/adapter labels belong to ``tenant``
    (``""``: the shared models, names without a tenant prefix). Series without such labels
    (in-flight gauge, per-replica counts) are the operator's and left out."""

    def __init__(self, registry, tenant: str):
        self.registry, self.tenant = registry, tenant

    def _mine(self, labels: dict) -> bool:
        names = [labels[k] for k in ("model", "adapter") if k in labels]
        return bool(names) and all(n.startswith(f"{self.tenant}/") if self.tenant else "/" not in n for n in names)

    def collect(self):
        for family in self.registry.collect():  # fresh Metric objects on every collect
            family.samples = [s for s in family.samples if self._mine(s.labels)]
            if family.samples:
                yield family
