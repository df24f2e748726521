"""Prometheus metrics: the mesh's instruments, and the endpoint every service serves them on.

Instruments on the request path are observed once per call or per batch; counts that a
service already keeps (batcher, cache and backend statistics) are read only when Prometheus
scrapes, by collectors the service registers (:func:`register_collector`), so they cost the
request path nothing.

Every service serves ``/metrics`` on ``SCOREMESH_METRICS_PORT`` (0: a port the OS picks,
announced in ``$SCOREMESH_HOME/run/<service>-metrics.addr``); the gateway also serves it on
its HTTP port.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

__all__ = [
    "BATCHES",
    "BATCH_QUEUE_SECONDS",
    "BATCH_ROWS",
    "CONTENT_TYPE",
    "JOB_SECONDS",
    "RPC_DURATION",
    "RPC_REQUESTS",
    "TRAINING_QUEUE",
    "MetricsServer",
    "gauge",
    "register_collector",
    "render",
    "serve_metrics",
]

log = logging.getLogger(__name__)

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

RPC_REQUESTS: Final = Counter(
    "scoremesh_rpc_requests", "gRPC calls served, by method and status code", ["service", "method", "code"]
)
RPC_DURATION: Final = Histogram(
    "scoremesh_rpc_duration_seconds",
    "Time to serve a gRPC call, by method and status code",
    ["service", "method", "code"],
    buckets=_LATENCY_BUCKETS,
)
HTTP_REQUESTS: Final = Counter(
    "scoremesh_http_requests", "HTTP requests the gateway served, by route and status", ["route", "status"]
)
HTTP_DURATION: Final = Histogram(
    "scoremesh_http_duration_seconds",
    "Time the gateway took for an HTTP request, by route",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
BATCHES: Final = Counter(
    "scoremesh_batches",
    "Batches executed, by why they left the queue: full (rows were left for the next) or drained",
    ["reason"],
)
BATCH_ROWS: Final = Histogram(
    "scoremesh_batch_rows", "Rows per executed batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
)
BATCH_QUEUE_SECONDS: Final = Histogram(
    "scoremesh_batch_queue_seconds", "Time a request waited in the batcher's queue", buckets=_LATENCY_BUCKETS
)
TRAINING_QUEUE: Final = Gauge("scoremesh_training_jobs", "Training jobs, by state", ["state"])
JOB_SECONDS: Final = Histogram(
    "scoremesh_training_attempt_seconds",
    "Duration of training job attempts, by plugin and outcome",
    ["plugin", "state"],
    buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
)


def gauge(name: str, documentation: str, values: Iterable[tuple[dict[str, str], float]]) -> GaugeMetricFamily:
    """A gauge family for a collector: one sample per (labels, value)."""
    samples = list(values)
    labels = sorted(samples[0][0]) if samples else []
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for sample_labels, value in samples:
        family.add_metric([sample_labels[label] for label in labels], value)
    return family


class _Callbacks(Collector):
    """The collector of every registered callback. A process normally holds one service;
    where it holds two (tests), the first to report a family wins and the other's
    same-named family is left out, as the text format allows a family once."""

    def __init__(self) -> None:
        self.callbacks: dict[int, Callable[[], Iterable[Metric]]] = {}

    def collect(self) -> Iterable[Metric]:
        seen: set[str] = set()
        for collect in list(self.callbacks.values()):
            try:
                families = list(collect())
            except Exception:  # a scrape must not fail because one reading did
                log.exception("a metrics collector failed")
                continue
            for family in families:
                if family.name not in seen:
                    seen.add(family.name)
                    yield family


_callbacks = _Callbacks()
_registered = False


def register_collector(collect: Callable[[], Iterable[Metric]]) -> Callable[[], None]:
    """Has ``collect`` called on every scrape; returns the function that stops that."""
    global _registered
    if not _registered:
        REGISTRY.register(_callbacks)
        _registered = True
    key = id(collect)
    _callbacks.callbacks[key] = collect

    def unregister() -> None:
        _callbacks.callbacks.pop(key, None)

    return unregister


def render() -> bytes:
    """The registry in Prometheus's text format."""
    return generate_latest(REGISTRY)


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint (a thread, as prometheus_client serves it)."""

    host: str
    port: int
    _shutdown: Callable[[], None]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        self._shutdown()


def serve_metrics(host: str, port: int) -> MetricsServer:
    """Serves the registry on ``http://host:port/metrics`` (port 0: the OS picks)."""
    server, thread = start_http_server(port, addr=host)

    def shutdown() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    bound = int(server.server_address[1])
    return MetricsServer(host, bound, shutdown)
