"""The lean tracer's OTLP export into the mesh's real receiver on 127.0.0.1: over HTTP (plain
and gzip) and over gRPC, with the standard variables; a collector that is not there yet is
waited for within the timeout, one that stays away costs the batch and nothing else."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.trace import Link, SpanKind, StatusCode

from services.mesh.otlp import ExportSettings, OtlpExporter
from services.mesh.settings import MeshSettings
from services.mesh.spans import LeanTracerProvider, QueueSettings, Sampler
from services.traces.receiver import OtlpReceiver
from services.traces.settings import TracesSettings
from services.traces.store import TraceStore

pytestmark = pytest.mark.integration

ALWAYS = Sampler(parent_based=True, bound=1 << 64)
RESOURCE = {"service.name": "scoremesh-tests"}


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[OtlpReceiver]:
    home = tmp_path / "home"
    mesh = MeshSettings.from_env({"SCOREMESH_HOME": str(home), "SCOREMESH_SHUTDOWN_GRACE_S": "2"})
    async with OtlpReceiver(TracesSettings.from_env(home, {}), mesh) as running:
        yield running


def _build_trace(provider: LeanTracerProvider) -> int:
    """A server span with a child, a link and an event; returns the trace id."""
    tracer = provider.get_tracer("tests.export", "1")
    with tracer.start_as_current_span(
        "/inference.GRPCInferenceService/ModelInfer",
        kind=SpanKind.SERVER,
        attributes={"rpc.method": "ModelInfer", "scoremesh.model": "iris", "scoremesh.version": 3},
    ) as server:
        with tracer.start_as_current_span("batch", attributes={"scoremesh.batch_size": 4}) as batch:
            batch.add_link(server.get_span_context())
            batch.add_event("split", {"parts": 2})
        server.set_status(StatusCode.ERROR, "UNAVAILABLE: Triton went away")
    return server.get_span_context().trace_id


async def _stored(receiver: OtlpReceiver, trace_id: int) -> list[tuple[str, str | None, str, int]]:
    await receiver.stop()  # commits what arrived
    store = TraceStore.open_reader(receiver.settings.store_path)
    assert store is not None
    try:
        spans = store.spans(f"{trace_id:032x}")
    finally:
        store.close()
    return [(s.name, s.parent_span_id, s.service, s.status_code) for s in spans]


async def _export_one_trace(env: dict[str, str]) -> int:
    settings = ExportSettings.from_env(env)
    provider = LeanTracerProvider(OtlpExporter(settings, RESOURCE), sampler=ALWAYS)
    trace_id = _build_trace(provider)
    # the exporter blocks: off the event loop, as the export thread would run it
    assert await asyncio.to_thread(provider.force_flush)
    await asyncio.to_thread(provider.shutdown)
    assert provider.queue.failed == 0
    return trace_id


def _expect_the_trace(stored: list[tuple[str, str | None, str, int]]) -> None:
    names = [name for name, _, _, _ in stored]
    assert names == ["/inference.GRPCInferenceService/ModelInfer", "batch"]
    (_, root_parent, service, root_status), (_, batch_parent, _, _) = stored
    assert not root_parent  # the store keeps "" for a root
    assert batch_parent
    assert service == "scoremesh-tests"
    assert root_status == StatusCode.ERROR.value


@pytest.mark.parametrize("compression", ["none", "gzip"])
async def test_http_export_reaches_the_receiver(receiver: OtlpReceiver, compression: str) -> None:
    trace_id = await _export_one_trace(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.http_address}",
            "OTEL_EXPORTER_OTLP_COMPRESSION": compression,
            "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=tests",
        }
    )
    _expect_the_trace(await _stored(receiver, trace_id))


@pytest.mark.parametrize("compression", ["none", "gzip"])
async def test_grpc_export_reaches_the_receiver(receiver: OtlpReceiver, compression: str) -> None:
    trace_id = await _export_one_trace(
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.grpc_address}",
            "OTEL_EXPORTER_OTLP_COMPRESSION": compression,
        }
    )
    _expect_the_trace(await _stored(receiver, trace_id))


async def test_the_links_and_events_arrive(receiver: OtlpReceiver) -> None:
    provider = LeanTracerProvider(
        OtlpExporter(
            ExportSettings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.http_address}"}),
            RESOURCE,
        ),
        sampler=ALWAYS,
    )
    tracer = provider.get_tracer("tests.export")
    first = tracer.start_span("first")
    first.end()
    linked = tracer.start_span("linked", links=[Link(first.get_span_context(), {"member": 0})])
    linked.add_event("queued", {"rows": 4})
    linked.end()
    await asyncio.to_thread(provider.shutdown)
    await receiver.stop()
    store = TraceStore.open_reader(receiver.settings.store_path)
    assert store is not None
    try:
        (stored,) = store.spans(f"{linked.get_span_context().trace_id:032x}")
    finally:
        store.close()
    assert stored.name == "linked"
    assert [link["span_id"] for link in stored.links] == [f"{first.get_span_context().span_id:016x}"]
    assert [event["name"] for event in stored.events] == ["queued"]


def _unused_port() -> tuple[socket.socket, int]:
    """A port nothing answers on: bound, never listened on, held until the test ends."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    return holder, holder.getsockname()[1]


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
async def test_a_collector_that_stays_away_costs_the_batch_only(protocol: str) -> None:
    holder, port = _unused_port()
    with holder:
        env = {
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "1500",  # ms: the first retry comes after ~1 s
        }
        provider = LeanTracerProvider(
            OtlpExporter(ExportSettings.from_env(env), RESOURCE),
            sampler=ALWAYS,
            queue=QueueSettings(delay_s=60),
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        provider.get_tracer("tests").start_span("lost").end()
        await asyncio.to_thread(provider.force_flush)
        elapsed = loop.time() - started
        assert provider.queue.failed == 1
        assert elapsed < 10, "the export must give up within its timeout"
        # spans go on being recorded, and the next batch is tried again
        following = provider.get_tracer("tests").start_span("next")
        assert following.is_recording()
        following.end()
        await asyncio.to_thread(provider.shutdown)
        assert provider.queue.failed == 2


async def test_a_busy_collector_is_tried_again() -> None:
    # the mesh's receiver never says it is busy; this one answers 503 once, then takes the body
    bodies: list[ExportTraceServiceRequest] = []
    refused = 0

    async def traces(request: web.Request) -> web.Response:
        nonlocal refused
        body = await request.read()
        if not refused:
            refused += 1
            return web.Response(status=503)
        bodies.append(ExportTraceServiceRequest.FromString(body))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "20000",
        }
        exporter = OtlpExporter(ExportSettings.from_env(env), RESOURCE)
        provider = LeanTracerProvider(exporter, sampler=ALWAYS, queue=QueueSettings(delay_s=60))
        trace_id = _build_trace(provider)
        assert await asyncio.to_thread(provider.force_flush)
        await asyncio.to_thread(provider.shutdown)
    finally:
        await runner.cleanup()
    assert refused == 1
    assert exporter.retries == 1
    assert provider.queue.failed == 0
    (request,) = bodies
    spans = request.resource_spans[0].scope_spans[0].spans
    assert {span.trace_id for span in spans} == {trace_id.to_bytes(16, "big")}
