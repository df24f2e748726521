"""What the scoring service reports to Prometheus beyond its calls and batches: cache, backend
health and fallback counts, read from the statistics the service keeps, at scrape time."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from services.mesh.metrics import gauge
from services.scoring.backends import BackendSet
from services.scoring.breaker import BreakerState
from services.scoring.cache import ResponseCache


def collector(cache: ResponseCache, backends: BackendSet) -> Iterable[Metric]:
    lookups = CounterMetricFamily(
        "scoremesh_cache_lookups", "Response cache lookups, by result", labels=["result"]
    )
    stats = cache.stats
    for result, count in (("hit", stats.hits), ("miss", stats.misses), ("shared", stats.shared)):
        lookups.add_metric([result], count)
    yield lookups
    yield GaugeMetricFamily("scoremesh_cache_bytes", "Bytes held by the response cache", value=stats.bytes)
    breaker = backends.breaker
    healthy = breaker is None or breaker.state is not BreakerState.OPEN
    yield gauge(
        "scoremesh_backend_healthy",
        "1 while the primary backend takes batches (its circuit breaker is not open)",
        [({"backend": backends.primary.name}, 1.0 if healthy else 0.0)],
    )
    counts = backends.stats
    yield CounterMetricFamily(
        "scoremesh_backend_fallback_batches",
        "Batches the in-process onnxruntime ran instead of the primary",
        value=counts.fallback_batches,
    )
    yield CounterMetricFamily(
        "scoremesh_backend_canary_failures", "Canary inferences that failed", value=counts.canary_failures
    )
