"""What a traced scoring request's spans cost in CPU, in one process, without the noise of a
shared machine: the official OpenTelemetry SDK against the mesh's lean tracer (spans.py and
otlp.py), for the same spans.

One "request" makes the spans the scoring service makes for a single-row request at
concurrency 64 (bench/README.md, "Tracing"): a SERVER span continuing a ``traceparent``
(with the interceptor's three ``rpc.*`` attributes and its status code), a ``queue wait``
span, and, for every ``--rows-per-batch`` requests, a ``batch`` span linked to each member
and a ``backend`` span whose context is injected as a ``traceparent`` for Triton. Spans are
batched as the services batch them and encoded to OTLP protobuf (the SDK's encoder, or
otlp.py's) by the export thread; nothing is sent, so the numbers leave out the transport
(about 1 µs of CPU per span with otlp.py's HTTP transport) and the collector.

Each tracer is measured twice: with a caller's ``traceparent`` that says "sampled" (every
span recorded and exported) and one that says "not sampled" (the API calls alone, what the
other 90% of requests cost at 10% sampling; slightly more than the service's, which skips
the queue-wait span of an unsampled request).

CPU is the process's (``time.process_time``: both the caller's thread and the export
thread), per request and per span, with every span exported before the clock stops.

Run with ``.venv/bin/python -m bench.spans``; results go to ``bench/results/spans.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, NonRecordingSpan, SpanKind
from opentelemetry.util.types import AttributeValue

from services.mesh.otlp import OtlpEncoder
from services.mesh.spans import LeanTracerProvider, QueueSettings, Sampler, SpanRecord

RESULTS: Final = Path(__file__).parent / "results" / "spans.json"
RESOURCE = {"service.name": "scoremesh-scoring"}
SERVER_ATTRIBUTES: Final[dict[str, AttributeValue]] = {
    "rpc.system": "grpc",
    "rpc.service": "inference.GRPCInferenceService",
    "rpc.method": "ModelInfer",
}
VERSION_ATTRIBUTES: Final[dict[str, AttributeValue]] = {
    "scoremesh.model": "tiny",
    "scoremesh.version": 1,
    "scoremesh.backend": "onnxruntime",
}
# large enough that neither tracer drops a span of a measurement
QUEUE_SIZE: Final = 1 << 20
TRACEPARENT = "00-{trace:032x}-00f067aa0ba902b7-{flags}"
KINDS = ("sdk", "lean", "sdk unsampled", "lean unsampled")
"""The tracer, and whether the caller's traceparent says "sampled" (every span recorded and
exported) or "not sampled" (what 90% of requests cost at 10% sampling: the same API calls,
nothing recorded)."""


class SdkEncoding(SpanExporter):
    """Encodes with the SDK's OTLP encoder, as its HTTP and gRPC exporters do; sends nothing."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        encode_spans(spans).SerializePartialToString()
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


class LeanEncoding:
    """Encodes with otlp.py's encoder, as its exporter does; sends nothing."""

    def __init__(self) -> None:
        self._encoder = OtlpEncoder(RESOURCE)
        self.spans = 0

    def export(self, spans: Sequence[SpanRecord]) -> bool:
        self._encoder.request(spans)
        self.spans += len(spans)
        return True

    def shutdown(self) -> None:
        pass


def sdk_provider() -> tuple[trace.TracerProvider, Callable[[], int]]:
    exporter = SdkEncoding()
    provider = TracerProvider(resource=Resource.create(RESOURCE))
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=QUEUE_SIZE))
    return provider, lambda: exporter.spans


def lean_provider() -> tuple[trace.TracerProvider, Callable[[], int]]:
    exporter = LeanEncoding()
    provider = LeanTracerProvider(
        exporter, sampler=Sampler(parent_based=True, bound=1 << 64), queue=QueueSettings()
    )
    return provider, lambda: exporter.spans


def run_requests(
    provider: trace.TracerProvider, requests: int, rows_per_batch: int, *, sampled: bool = True
) -> None:
    """``requests`` traced requests' spans, made as the scoring service makes them."""
    server_tracer = provider.get_tracer("services.mesh.interceptors")
    batch_tracer = provider.get_tracer("services.scoring.batcher")
    service_tracer = provider.get_tracer("services.scoring.service")
    members: list[trace.SpanContext] = []
    enqueued: list[int] = []
    for number in range(requests):
        # the interceptor: the caller's context, the server span made current
        traceparent = TRACEPARENT.format(trace=number + 1, flags="01" if sampled else "00")
        parent = propagate.extract({"traceparent": traceparent})
        span = server_tracer.start_span(
            "/inference.GRPCInferenceService/ModelInfer", parent, SpanKind.SERVER, SERVER_ATTRIBUTES
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        members.append(span.get_span_context())
        enqueued.append(time.time_ns())
        if len(members) == rows_per_batch:
            # the batcher: a queue wait per member, then the batch and, inside it, the backend
            started = time.time_ns()
            for context, start in zip(members, enqueued, strict=True):
                wait_parent = trace.set_span_in_context(NonRecordingSpan(context))
                wait = batch_tracer.start_span("queue wait", context=wait_parent, start_time=start)
                wait.end(end_time=started)
            with (
                batch_tracer.start_as_current_span(
                    "batch",
                    context=trace.set_span_in_context(NonRecordingSpan(members[0])),
                    links=[Link(context) for context in members],
                    attributes={
                        **VERSION_ATTRIBUTES,
                        "scoremesh.batch_size": len(members),
                        "scoremesh.batch_requests": len(members),
                    },
                ),
                service_tracer.start_as_current_span("backend onnxruntime", attributes=VERSION_ATTRIBUTES),
            ):
                headers: dict[str, str] = {}
                propagate.inject(headers)
            members.clear()
            enqueued.clear()
        span.set_attributes(VERSION_ATTRIBUTES)
        span.set_attribute("rpc.grpc.status_code", 0)
        span.end()
        otel_context.detach(token)


def measure(kind: str, requests: int, rows_per_batch: int) -> dict[str, Any]:
    provider, exported = sdk_provider() if kind.startswith("sdk") else lean_provider()
    sampled = not kind.endswith("unsampled")
    run_requests(provider, 200, rows_per_batch, sampled=sampled)  # warm-up: caches, first tracers
    provider.force_flush()  # type: ignore[attr-defined]
    before = exported()
    cpu = time.process_time()
    run_requests(provider, requests, rows_per_batch, sampled=sampled)
    provider.force_flush()  # type: ignore[attr-defined]
    cpu = time.process_time() - cpu
    spans = exported() - before
    expected = requests * 2 + requests // rows_per_batch * 2 if sampled else 0
    assert spans == expected, f"{kind} exported {spans} spans of {expected}"
    provider.shutdown()  # type: ignore[attr-defined]
    return {
        "requests": requests,
        "spans": spans,
        "cpu_us_per_request": round(cpu / requests * 1e6, 1),
        "cpu_us_per_span": round(cpu / spans * 1e6, 2) if spans else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000, help="traced requests per measurement")
    parser.add_argument("--rows-per-batch", type=int, default=2, help="requests per batch span")
    parser.add_argument("--repeats", type=int, default=5, help="measurements of each tracer, alternating")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    for repeat in range(args.repeats):
        for kind in KINDS if repeat % 2 == 0 else reversed(KINDS):
            result = measure(kind, args.requests, args.rows_per_batch)
            runs[kind].append(result)
            print(f"{repeat + 1} {kind:<14} {result}", flush=True)
    summary = {
        kind: {
            "cpu_us_per_request": statistics.median(r["cpu_us_per_request"] for r in results),
            "cpu_us_per_span": (
                statistics.median(r["cpu_us_per_span"] for r in results) if results[0]["spans"] else None
            ),
            "spans_per_request": round(results[0]["spans"] / results[0]["requests"], 2),
        }
        for kind, results in runs.items()
    }
    lean, sdk = summary["lean"]["cpu_us_per_request"], summary["sdk"]["cpu_us_per_request"]
    summary["lean_over_sdk"] = {"cpu_per_request": round(lean / sdk, 3)}
    # at 10% sampling: a tenth of requests traced, the rest carrying the decision only
    summary["at_10pct_us_per_request"] = {
        tracer: round(
            0.1 * summary[tracer]["cpu_us_per_request"]
            + 0.9 * summary[f"{tracer} unsampled"]["cpu_us_per_request"],
            1,
        )
        for tracer in ("sdk", "lean")
    }
    print(json.dumps(summary, indent=2))
    results = {
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "arguments": vars(args),
        "runs": runs,
        "summary": summary,
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
