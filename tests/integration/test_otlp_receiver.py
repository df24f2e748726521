"""The local OTLP receiver on 127.0.0.1:0, fed by the OpenTelemetry SDK's own OTLP/gRPC and
OTLP/HTTP exporters and by an OTLP/HTTP JSON body like Triton's, then read back by
``scoremesh traces`` as a real process; bad payloads, and what ``scoremesh up`` passes on."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from services.mesh.settings import MeshSettings
from services.scoring.triton_server import trace_args_from_env
from services.traces.local import start_trace_export
from services.traces.receiver import TRACE_SERVICE, OtlpReceiver
from services.traces.settings import TracesSettings
from tests.integration.cli_harness import run_cli

pytestmark = pytest.mark.integration

EXPORT = f"/{TRACE_SERVICE}/Export"
CALL_TIMEOUT_S = 10.0


def _mesh(home: Path) -> MeshSettings:
    return MeshSettings.from_env({"SCOREMESH_HOME": str(home), "SCOREMESH_SHUTDOWN_GRACE_S": "2"})


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
async def receiver(home: Path) -> AsyncIterator[OtlpReceiver]:
    async with OtlpReceiver(TracesSettings.from_env(home, {}), _mesh(home)) as running:
        yield running


def _tracer(service: str, memory: InMemorySpanExporter) -> tuple[TracerProvider, trace.Tracer]:
    provider = TracerProvider(resource=Resource({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider, provider.get_tracer("tests.otlp")


async def _export(exporter: SpanExporter, spans: Sequence[ReadableSpan]) -> SpanExportResult:
    """The SDK's exporter, blocking as it is, off the event loop; shut down afterwards."""

    def export() -> SpanExportResult:
        try:
            return exporter.export(spans)
        finally:
            exporter.shutdown()

    return await asyncio.to_thread(export)


def _grpc_exporter(receiver: OtlpReceiver) -> GrpcExporter:
    return GrpcExporter(endpoint=f"http://{receiver.grpc_address}", insecure=True, timeout=CALL_TIMEOUT_S)


def _http_exporter(receiver: OtlpReceiver, *, gzip: bool = False) -> HttpExporter:
    return HttpExporter(
        endpoint=f"http://{receiver.http_address}/v1/traces",
        timeout=CALL_TIMEOUT_S,
        compression=Compression.Gzip if gzip else Compression.NoCompression,
    )


def _triton_body(trace_id: int, parent_span_id: int, start_ns: int, end_ns: int) -> dict[str, Any]:
    """What Triton's OpenTelemetry mode sends: OTLP/HTTP JSON, ids in hex, 64-bit numbers as
    strings, an InferRequest span, one per model and a compute span under it."""

    def span(span_id: int, parent: int, name: str, start: int, end: int, **extra: Any) -> dict[str, Any]:
        return {
            "traceId": f"{trace_id:032x}",
            "spanId": f"{span_id:016x}",
            "parentSpanId": f"{parent:016x}",
            "name": name,
            "kind": 2,
            "startTimeUnixNano": str(start),
            "endTimeUnixNano": str(end),
            "status": {},
            **extra,
        }

    third = (end_ns - start_ns) // 3
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "triton"}}]},
                "scopeSpans": [
                    {
                        "scope": {"name": "triton-server"},
                        "spans": [
                            span(0xC1, parent_span_id, "InferRequest", start_ns, end_ns),
                            span(
                                0xC2,
                                0xC1,
                                "iris",
                                start_ns + third // 2,
                                end_ns - third // 2,
                                attributes=[
                                    {"key": "triton.model_name", "value": {"stringValue": "iris"}},
                                    {"key": "triton.model_version", "value": {"intValue": "1"}},
                                ],
                                events=[{"timeUnixNano": str(start_ns + third), "name": "QUEUE_START"}],
                            ),
                            span(0xC3, 0xC2, "compute", start_ns + third, end_ns - third),
                        ],
                    }
                ],
            }
        ]
    }


def _spans(build: Callable[[], None], *memories: InMemorySpanExporter) -> list[list[ReadableSpan]]:
    build()
    return [list(memory.get_finished_spans()) for memory in memories]


async def _post(
    session: aiohttp.ClientSession,
    receiver: OtlpReceiver,
    body: bytes,
    content_type: str,
    path: str = "/v1/traces",
) -> tuple[int, str, bytes]:
    async with session.post(
        f"http://{receiver.http_address}{path}", data=body, headers={"Content-Type": content_type}
    ) as response:
        return response.status, response.content_type, await response.read()


async def test_spans_from_every_exporter_read_back_by_the_cli(receiver: OtlpReceiver, home: Path) -> None:
    env = {"SCOREMESH_HOME": str(home)}
    gateway_memory, scoring_memory, training_memory = (InMemorySpanExporter() for _ in range(3))
    gateway_provider, gateway = _tracer("scoremesh-gateway", gateway_memory)
    scoring_provider, scoring = _tracer("scoremesh-scoring", scoring_memory)
    training_provider, training = _tracer("scoremesh-training", training_memory)

    def build() -> None:
        # one request through the gateway into scoring (which fails it), and a later, quick
        # training call of its own; the child spans join the gateway's trace through the
        # context, as the interceptors' propagation would across processes. The two roots'
        # times are set, so that which is slower and which is newer is known.
        now = time.time_ns()
        with (
            gateway.start_as_current_span(
                "POST /v2/models/{name}/infer",
                kind=SpanKind.SERVER,
                attributes={"http.route": "/v2/models/{name}/infer", "http.status_code": 500},
                start_time=now - 1_000_000,
                end_on_exit=False,
            ) as root,
            scoring.start_as_current_span(
                "inference.GRPCInferenceService/ModelInfer",
                kind=SpanKind.SERVER,
                attributes={"rpc.method": "ModelInfer", "scoremesh.model": "iris", "scoremesh.version": 1},
            ) as server_span,
        ):
            with scoring.start_as_current_span(
                "triton ModelInfer", kind=SpanKind.CLIENT, attributes={"scoremesh.backend": "triton"}
            ):
                pass
            server_span.set_status(StatusCode.ERROR, "Triton failed")
        root.end(end_time=max(time.time_ns(), now + 50_000_000))
        quick = training.start_span(
            "scoremesh.training.v1.Training/SubmitJob",
            attributes={"scoremesh.model": "digits"},
            start_time=now + 100_000_000,
        )
        quick.end(end_time=now + 100_001_000)
        for provider in (gateway_provider, scoring_provider, training_provider):
            provider.shutdown()

    gateway_spans, scoring_spans, training_spans = _spans(
        build, gateway_memory, scoring_memory, training_memory
    )
    assert await _export(_http_exporter(receiver, gzip=True), gateway_spans) == SpanExportResult.SUCCESS
    assert await _export(_grpc_exporter(receiver), scoring_spans) == SpanExportResult.SUCCESS
    assert await _export(_http_exporter(receiver), training_spans) == SpanExportResult.SUCCESS

    # Triton's spans continue scoring's client span, posted where trace_args_from_env sends them
    client = next(s for s in scoring_spans if s.name == "triton ModelInfer")
    context = client.get_span_context()
    assert context is not None
    assert client.start_time is not None
    assert client.end_time is not None
    triton_url = trace_args_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.http_address}"})
    assert f"opentelemetry,url={receiver.http_address}/v1/traces" in triton_url
    body = _triton_body(context.trace_id, context.span_id, client.start_time, client.end_time)
    async with aiohttp.ClientSession() as session:
        status, content_type, answer = await _post(
            session, receiver, json.dumps(body).encode(), "application/json"
        )
    assert (status, content_type) == (200, "application/json"), answer
    assert json.loads(answer) == {}

    trace_id = f"{context.trace_id:032x}"
    training_trace = f"{training_spans[0].context.trace_id:032x}"

    # the list, slowest first, read while the receiver still writes
    code, out, err = await run_cli(env, "traces", "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert [t["trace_id"] for t in listed] == [trace_id, training_trace]
    first = listed[0]
    assert first["root_name"] == "POST /v2/models/{name}/infer"
    assert first["services"] == ["scoremesh-gateway", "scoremesh-scoring", "triton"]
    assert (first["span_count"], first["status"]) == (6, "error")
    assert listed[1]["status"] == "ok"

    code, out, err = await run_cli(env, "traces")
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["TRACE", "ID", "ROOT"]
    assert rows[0].startswith(trace_id)
    assert "gateway, scoring, triton" in rows[0]
    assert rows[0].endswith("error")
    assert rows[1].startswith(training_trace)
    assert rows[1].endswith("ok")

    async def listed_ids(*filters: str) -> list[str]:
        code, out, err = await run_cli(env, "traces", "--json", *filters)
        assert code == 0, err
        return [t["trace_id"] for t in json.loads(out)]

    assert await listed_ids("--model", "iris") == [trace_id]
    assert await listed_ids("--model", "digits") == [training_trace]
    assert await listed_ids("--service", "triton") == [trace_id]
    assert await listed_ids("--service", "training") == [training_trace]
    assert await listed_ids("--status", "ok") == [training_trace]
    assert await listed_ids("--status", "error") == [trace_id]
    assert await listed_ids("--since", "10m", "--limit", "1") == [trace_id]
    assert await listed_ids("--sort", "start") == [training_trace, trace_id]

    # one trace as a waterfall: every span in tree order, indented under its parent
    code, out, err = await run_cli(env, "traces", trace_id)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"trace {trace_id}  POST /v2/models/{{name}}/infer"
    assert "6 spans, 3 services (gateway, scoring, triton)" in lines[1]
    name_width = lines[3].index("SERVICE")
    spans = lines[4:]
    assert [line[:name_width].rstrip() for line in spans] == [
        "POST /v2/models/{name}/infer",
        "  inference.GRPCInferenceService/ModelInfer",
        "    triton ModelInfer",
        "      InferRequest",
        "        iris",
        "          compute",
    ]
    assert "scoremesh.model=iris" in spans[1]
    assert 'error="Triton failed"' in spans[1]
    assert " error " in spans[1]
    assert "|" in spans[1]
    assert "triton.model_name=iris triton.model_version=1" in spans[4]

    code, out, err = await run_cli(env, "traces", trace_id[:12], "--json")  # a unique prefix will do
    assert code == 0, err
    shown = json.loads(out)
    assert [(s["name"], s["depth"], s["service"]) for s in shown][2:] == [
        ("triton ModelInfer", 2, "scoremesh-scoring"),
        ("InferRequest", 3, "triton"),
        ("iris", 4, "triton"),
        ("compute", 5, "triton"),
    ]
    assert shown[1]["status"] == {"code": "ERROR", "message": "Triton failed"}
    assert shown[4]["events"][0]["name"] == "QUEUE_START"

    # a trace that is not there, and filters that do not apply to one trace
    missing = "0" * 32
    code, out, err = await run_cli(env, "traces", missing)
    assert (code, out) == (1, "")
    assert err.strip().splitlines() == [f"scoremesh: no trace {missing} in {home / 'traces'}"]
    code, _, err = await run_cli(env, "traces", trace_id, "--service", "triton")
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    code, _, err = await run_cli(env, "traces", "not-an-id")
    assert code == 2
    assert "is not a trace id" in err


async def test_bad_payloads_are_refused_and_the_receiver_stays_healthy(receiver: OtlpReceiver) -> None:
    async with aiohttp.ClientSession() as session:
        for body, content_type in [
            (b"\xff\xff\xff", "application/x-protobuf"),
            (b"{not json", "application/json"),
            (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "xyz!"}]}]}]}', "application/json"),
            (b'{"resourceSpans": "nope"}', "application/json"),
        ]:
            status, content_type_back, answer = await _post(session, receiver, body, content_type)
            assert (status, content_type_back) == (400, "application/json"), answer
            error = json.loads(answer)
            assert error["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert error["message"]

        status, _, answer = await _post(session, receiver, b"x", "text/plain")
        assert status == 415
        assert json.loads(answer)["message"]
        status, _, answer = await _post(session, receiver, b"", "application/x-protobuf", path="/v1/metrics")
        assert status == 404
        assert "/v1/traces" in json.loads(answer)["message"]
        async with session.get(f"http://{receiver.http_address}/v1/traces") as response:
            assert response.status == 405
            assert response.headers["Allow"] == "POST"

        # a span with a bad id is rejected alone, as OTLP's partial success
        good = {"traceId": "01" * 16, "spanId": "02" * 8, "name": "good"}
        bad = {"traceId": "01" * 4, "spanId": "03" * 8, "name": "bad"}
        document = {"resourceSpans": [{"scopeSpans": [{"spans": [good, bad]}]}]}
        status, _, answer = await _post(session, receiver, json.dumps(document).encode(), "application/json")
        assert status == 200, answer
        partial = json.loads(answer)["partialSuccess"]
        assert partial["rejectedSpans"] == "1"
        assert "bad" in partial["errorMessage"]

        # protobuf in, protobuf out
        request = ExportTraceServiceRequest()
        status, content_type, answer = await _post(
            session, receiver, request.SerializeToString(), "application/x-protobuf"
        )
        assert (status, content_type) == (200, "application/x-protobuf")
        assert ExportTraceServiceResponse.FromString(answer) == ExportTraceServiceResponse()

    async with grpc.aio.insecure_channel(receiver.grpc_address) as channel:
        export = channel.unary_unary(EXPORT, _as_is, _as_is)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await export(b"\xff\xff\xff", timeout=CALL_TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=TRACE_SERVICE), timeout=CALL_TIMEOUT_S
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING

    # and both transports still take spans
    memory = InMemorySpanExporter()
    provider, tracer = _tracer("after", memory)
    with tracer.start_as_current_span("still here"):
        pass
    provider.shutdown()
    finished = list(memory.get_finished_spans())
    assert await _export(_grpc_exporter(receiver), finished) == SpanExportResult.SUCCESS
    assert await _export(_http_exporter(receiver), finished) == SpanExportResult.SUCCESS


async def test_up_points_every_service_at_the_local_receiver(home: Path, tmp_path: Path) -> None:
    mesh = _mesh(home)
    # the user's own endpoint wins, and tracing may be off: then nothing starts
    for env, summary in [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "exported to http://collector:4318"),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"},
            "exported to http://c:4318/v1/traces",
        ),
        ({"OTEL_SDK_DISABLED": "true"}, "off"),
        ({"OTEL_TRACES_EXPORTER": "none"}, "off"),
    ]:
        export = await start_trace_export(mesh, env)
        assert (export.receiver, dict(export.environment)) == (None, {})
        assert export.summary.startswith(summary)
        await export.close()

    export = await start_trace_export(mesh, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    try:
        assert export.receiver is not None
        assert export.environment == {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{export.receiver.grpc_address}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        }
    finally:
        await export.close()

    export = await start_trace_export(mesh, {})
    try:
        assert export.receiver is not None
        assert export.environment == {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{export.receiver.http_address}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        }
        assert f"http://{export.receiver.http_address}/v1/traces" in export.summary
        # a service process sets up tracing from exactly these variables, as main does
        script = (
            "from opentelemetry import trace\n"
            "from services.mesh.telemetry import setup_tracing\n"
            "shutdown = setup_tracing('scoremesh-unnamed')\n"
            "with trace.get_tracer('t').start_as_current_span('hello'):\n"
            "    pass\n"
            "shutdown()\n"
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            env={**_clean_environment(), **export.environment, "OTEL_SERVICE_NAME": "scoremesh-registry"},
        )
        assert await asyncio.wait_for(process.wait(), CALL_TIMEOUT_S * 3) == 0
    finally:
        await export.close()
    code, out, err = await run_cli({"SCOREMESH_HOME": str(home)}, "traces", "--json", "--service", "registry")
    assert code == 0, err
    [listed] = json.loads(out)
    assert (listed["root_name"], listed["services"]) == ("hello", ["scoremesh-registry"])


def _as_is(data: bytes) -> bytes:
    return data


def _clean_environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
