"""The kernel against real grpc.aio servers on 127.0.0.1:0, built by MeshServer and called
through channels from open_channel: error mapping for every handler kind, health, reflection,
graceful shutdown, deadlines, size limits, tracing and the serve() run loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from scoremesh.registry.v1 import registry_pb2 as reg
from scoremesh.registry.v1 import registry_pb2_grpc as reg_grpc
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from services.mesh.channels import open_channel
from services.mesh.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    MeshError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.mesh.interceptors import remaining_timeout
from services.mesh.server import MeshServer, Registration, address_file, serve
from services.mesh.settings import MeshSettings
from services.mesh.status import CODES, DOMAIN, RemoteError, describe, from_rpc_error
from services.mesh.telemetry import JsonFormatter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Context = grpc.aio.ServicerContext[Any, Any]

INFERENCE = "inference.GRPCInferenceService"
REGISTRY = "scoremesh.registry.v1.ModelRegistry"
ECHO = "scoremesh.test.v1.Echo"
INFER = "/inference.GRPCInferenceService/ModelInfer"
REMAINING_CAP_S = 1.5


def _error(cls: type[MeshError]) -> MeshError:
    """One instance of each domain error, with a reason and metadata to check on arrival."""
    metadata = {"model": "iris", "kind": cls.__name__}
    if cls is InvalidArgument:
        return InvalidArgument(
            "2 bad fields",
            violations=[
                FieldViolation("inputs[0].shape", "must be positive"),
                FieldViolation("id", "too long"),
            ],
            reason="BAD_TENSOR",
            metadata=metadata,
        )
    return cls(f"{cls.__name__} happened", reason=f"TEST_{cls.code_name}", metadata=metadata)


DOMAIN_ERRORS: list[type[MeshError]] = [
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    DeadlineExceeded,
]
ERRORS_BY_NAME = {cls.__name__: cls for cls in DOMAIN_ERRORS}


class Inference(oip_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """A test servicer whose ModelInfer does what the request's model_name says."""

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def ServerLive(self, request: oip.ServerLiveRequest, context: Context) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ModelInfer(self, request: oip.ModelInferRequest, context: Context) -> oip.ModelInferResponse:
        action, _, argument = request.model_name.partition(":")
        if action == "raise":
            raise _error(ERRORS_BY_NAME[argument])
        if action == "boom":
            raise RuntimeError("secret detail from /srv/scoremesh/private.py")
        if action == "abort":
            await context.abort(grpc.StatusCode.ABORTED, "handler aborted")
        if action == "set_code":
            context.set_code(grpc.StatusCode.OUT_OF_RANGE)
            context.set_details("set by the handler")
            return oip.ModelInferResponse()
        if action == "wait":
            self.started.set()
            await self.release.wait()
        if action == "forever":
            self.started.set()
            try:
                await asyncio.Event().wait()
            finally:
                self.cancelled.set()
        if action == "big":
            return oip.ModelInferResponse(raw_output_contents=[b"x" * (self.max_message_bytes + 1)])
        if action == "remaining":
            return oip.ModelInferResponse(id=repr(remaining_timeout(context, REMAINING_CAP_S)))
        if action == "trace":
            span_context = trace.get_current_span().get_span_context()
            return oip.ModelInferResponse(id=format(span_context.trace_id, "032x"))
        return oip.ModelInferResponse(model_name=request.model_name, id=request.id)


class RegistryStreams(reg_grpc.ModelRegistryServicer):  # type: ignore[misc]
    """Streaming handlers of each style that fail after some work."""

    async def WatchModels(
        self, request: reg.WatchModelsRequest, context: Context
    ) -> AsyncIterator[reg.WatchModelsResponse]:
        # an async generator: the usual way to stream
        yield reg.WatchModelsResponse(cursor="1", model="iris")
        if request.cursor == "boom":
            raise RuntimeError("secret stream detail")
        raise NotFound("model gone", reason="MODEL_NOT_FOUND", metadata={"model": "iris"})

    async def DownloadVersion(self, request: reg.DownloadVersionRequest, context: Context) -> None:
        # a coroutine writing with context.write(): the reader/writer style
        await context.write(reg.DownloadVersionResponse(chunk=b"abc"))
        raise InvalidArgument.for_field("version", "must be positive", reason="BAD_VERSION")

    async def UploadVersion(
        self, request_iterator: AsyncIterator[reg.UploadVersionRequest], context: Context
    ) -> reg.UploadVersionResponse:
        received = 0
        async for request in request_iterator:
            received += len(request.chunk)
        if received == 0:
            raise RuntimeError("secret upload detail")
        raise AlreadyExists(f"{received} bytes exist", reason="VERSION_EXISTS")


async def _echo(
    requests: AsyncIterator[oip.ModelInferRequest], context: Context
) -> AsyncIterator[oip.ModelInferResponse]:
    async for request in requests:
        if request.model_name == "deny":
            raise PermissionDenied("not yours", reason="TENANT_MISMATCH")
        yield oip.ModelInferResponse(id=request.id)


def _add_echo(servicer: object, server: grpc.aio.Server) -> None:
    # a stream-stream method: neither proto of the mesh has one
    handler = grpc.method_handlers_generic_handler(
        ECHO,
        {
            "Chat": grpc.stream_stream_rpc_method_handler(
                _echo,
                request_deserializer=oip.ModelInferRequest.FromString,
                response_serializer=oip.ModelInferResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))


def kernel_settings(home: Path, **env: str) -> MeshSettings:
    return MeshSettings.from_env(
        {
            "SCOREMESH_HOME": str(home),
            "SCOREMESH_MAX_MESSAGE_BYTES": "1MiB",
            "SCOREMESH_DEFAULT_DEADLINE_S": "10",
            "SCOREMESH_SHUTDOWN_GRACE_S": "10",
            **env,
        }
    )


@dataclass
class Kernel:
    server: MeshServer
    channel: grpc.aio.Channel
    inference: Inference
    settings: MeshSettings
    spans: InMemorySpanExporter = field(default_factory=InMemorySpanExporter)

    @property
    def stub(self) -> oip_grpc.GRPCInferenceServiceStub:
        return oip_grpc.GRPCInferenceServiceStub(self.channel)

    @property
    def registry(self) -> reg_grpc.ModelRegistryStub:
        return reg_grpc.ModelRegistryStub(self.channel)

    @property
    def health(self) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel)

    async def infer(self, model: str, **kwargs: Any) -> oip.ModelInferResponse:
        response: oip.ModelInferResponse = await self.stub.ModelInfer(
            oip.ModelInferRequest(model_name=model), **kwargs
        )
        return response

    async def infer_error(self, model: str, **kwargs: Any) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await self.infer(model, **kwargs)
        return raised.value


def build_server(
    settings: MeshSettings, provider: TracerProvider | None = None
) -> tuple[MeshServer, Inference]:
    inference = Inference(settings.max_message_bytes)
    server = MeshServer(
        "kernel-test",
        [
            Registration(INFERENCE, oip_grpc.add_GRPCInferenceServiceServicer_to_server, inference),
            Registration(REGISTRY, reg_grpc.add_ModelRegistryServicer_to_server, RegistryStreams()),
            Registration(ECHO, _add_echo, None),
        ],
        settings,
        tracer_provider=provider,
    )
    return server, inference


@contextlib.asynccontextmanager
async def running(settings: MeshSettings) -> AsyncIterator[Kernel]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    server, inference = build_server(settings, provider)
    await server.start()
    try:
        async with open_channel(server.address, settings) as channel:
            yield Kernel(server, channel, inference, settings, spans)
    finally:
        await server.stop(0)
        provider.shutdown()


@pytest.fixture
async def kernel(tmp_path: Path) -> AsyncIterator[Kernel]:
    async with running(kernel_settings(tmp_path)) as running_kernel:
        yield running_kernel


class Records(logging.Handler):
    """Log records as they arrive, for server work that ends after the client has its answer."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []  # formatted as they arrive, inside the call's context
        self.arrived = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))
        self.arrived.set()


@contextlib.contextmanager
def watch_log(name: str) -> Iterator[Records]:
    logger = logging.getLogger(name)
    records = Records()
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.WARNING)
    try:
        yield records
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    # grpc.aio yields (key, value) pairs; grpc-stubs describes the sync API's _Metadatum
    trailers: Any = error.trailing_metadata()
    for key, value in trailers or ():
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no rich status in {error!r}")


def unpack(status: status_pb2.Status, message_type: Callable[[], Any]) -> list[Any]:
    found = []
    for detail in status.details:
        message = message_type()
        if detail.Is(message.DESCRIPTOR):
            detail.Unpack(message)
            found.append(message)
    return found


def assert_domain_error(error: grpc.aio.AioRpcError, expected: MeshError) -> None:
    """The status carries the code, message, ErrorInfo and BadRequest of ``expected``, and
    from_rpc_error gives ``expected`` back."""
    assert error.code() is CODES[expected.code_name]
    assert error.details() == expected.message
    status = rich_status(error)
    assert status.code == error.code().value[0]
    [info] = unpack(status, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain, dict(info.metadata)) == (expected.reason, DOMAIN, expected.metadata)
    bad_requests = unpack(status, error_details_pb2.BadRequest)
    if isinstance(expected, InvalidArgument):
        [bad_request] = bad_requests
        assert [(v.field, v.description) for v in bad_request.field_violations] == [
            (v.field, v.description) for v in expected.violations
        ]
    else:
        assert bad_requests == []

    back = from_rpc_error(error)
    assert type(back) is type(expected)
    assert (back.message, back.reason, back.metadata) == (
        expected.message,
        expected.reason,
        expected.metadata,
    )
    if isinstance(expected, InvalidArgument):
        assert isinstance(back, InvalidArgument)
        assert back.violations == expected.violations


async def drain(call: Any) -> tuple[list[Any], grpc.aio.AioRpcError]:
    """The messages of a stream that must end in an error, and the error."""
    received = []
    try:
        async for response in call:
            received.append(response)
    except grpc.aio.AioRpcError as error:
        return received, error
    raise AssertionError("the stream ended without an error")


def assert_internal(error: grpc.aio.AioRpcError) -> None:
    assert error.code() is grpc.StatusCode.INTERNAL
    details = error.details() or ""
    assert details.startswith("internal error; see server logs (request id ")
    assert "secret" not in details
    assert "Traceback" not in details
    assert "secret" not in str(error.trailing_metadata())


# error mapping


@pytest.mark.parametrize("cls", DOMAIN_ERRORS, ids=lambda cls: cls.__name__)
async def test_domain_errors_arrive_with_code_and_details(kernel: Kernel, cls: type[MeshError]) -> None:
    error = await kernel.infer_error(f"raise:{cls.__name__}")
    assert_domain_error(error, _error(cls))


def test_every_domain_error_has_a_code() -> None:
    assert set(CODES) == {cls.code_name for cls in DOMAIN_ERRORS}


async def test_describe_is_one_line(kernel: Kernel) -> None:
    error = await kernel.infer_error("raise:InvalidArgument")
    text = describe(error)
    assert text == (
        "INVALID_ARGUMENT: 2 bad fields [BAD_TENSOR] (inputs[0].shape: must be positive; id: too long)"
    )
    assert describe(NotFound("model 'x' not found")) == "NOT_FOUND: model 'x' not found"
    single = InvalidArgument.for_field("name", "must not be empty")
    assert describe(single) == "INVALID_ARGUMENT: name: must not be empty"


async def test_unexpected_exception_is_internal_and_logged(
    kernel: Kernel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="services.mesh.interceptors"):
        error = await kernel.infer_error("boom", metadata=(("x-request-id", "req-42"),))
    assert_internal(error)
    assert "req-42" in (error.details() or "")

    back = from_rpc_error(error)
    assert isinstance(back, RemoteError)
    assert back.code_name == "INTERNAL"
    assert describe(error).startswith("INTERNAL: internal error; see server logs")

    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert "secret detail" in str(record.exc_info[1])
    assert record.__dict__["rpc_code"] == "INTERNAL"
    assert record.__dict__["rpc_method"] == INFER

    # the server goes on serving
    response = await kernel.stub.ServerLive(oip.ServerLiveRequest())
    assert response.live


async def test_failure_log_line_as_json(kernel: Kernel) -> None:
    with watch_log("services.mesh.interceptors") as records:
        await kernel.infer_error("boom", metadata=(("x-request-id", "req-7"),))
    [line] = records.lines
    entry = json.loads(line)
    span = _server_span(kernel)
    assert span.context is not None
    assert entry["level"] == "ERROR"
    assert entry["logger"] == "services.mesh.interceptors"
    assert entry["message"].startswith(f"INTERNAL {INFER} ")
    assert (entry["trace_id"], entry["span_id"]) == (
        format(span.context.trace_id, "032x"),
        format(span.context.span_id, "016x"),
    )
    assert entry["request_id"] == "req-7"
    assert (entry["rpc_method"], entry["rpc_code"]) == (INFER, "INTERNAL")
    assert entry["duration_ms"] >= 0
    assert "RuntimeError: secret detail" in entry["exception"]


async def test_handler_abort_keeps_its_status(kernel: Kernel) -> None:
    with watch_log("services.mesh.interceptors") as records:
        error = await kernel.infer_error("abort")
        assert (error.code(), error.details()) == (grpc.StatusCode.ABORTED, "handler aborted")
        # context.abort() sends the status before the interceptor sees AbortError
        async with asyncio.timeout(10):
            await records.arrived.wait()
    [record] = records.records
    assert (record.levelno, record.__dict__["rpc_code"]) == (logging.WARNING, "ABORTED")
    assert record.exc_info is None


async def test_handler_set_code_keeps_its_status(kernel: Kernel) -> None:
    error = await kernel.infer_error("set_code")
    assert (error.code(), error.details()) == (grpc.StatusCode.OUT_OF_RANGE, "set by the handler")


async def test_client_errors_log_warning_successes_debug(
    kernel: Kernel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="services.mesh.interceptors"):
        await kernel.infer_error("raise:NotFound")
        await kernel.infer("echo")
    failure, success = caplog.records
    assert failure.levelno == logging.WARNING
    assert failure.getMessage().startswith(f"NOT_FOUND {INFER} ")
    assert "NotFound happened [TEST_NOT_FOUND]" in failure.getMessage()
    assert success.levelno == logging.DEBUG
    assert success.getMessage().startswith(f"OK {INFER} ")


# streaming handlers


async def test_unary_stream_async_generator(kernel: Kernel) -> None:
    received, error = await drain(kernel.registry.WatchModels(reg.WatchModelsRequest()))
    assert [r.model for r in received] == ["iris"]
    assert_domain_error(error, NotFound("model gone", reason="MODEL_NOT_FOUND", metadata={"model": "iris"}))

    received, error = await drain(kernel.registry.WatchModels(reg.WatchModelsRequest(cursor="boom")))
    assert len(received) == 1
    assert_internal(error)


async def test_unary_stream_writer(kernel: Kernel) -> None:
    received, error = await drain(kernel.registry.DownloadVersion(reg.DownloadVersionRequest(model="iris")))
    assert [r.chunk for r in received] == [b"abc"]
    assert_domain_error(error, InvalidArgument.for_field("version", "must be positive", reason="BAD_VERSION"))


async def test_stream_unary(kernel: Kernel) -> None:
    requests = [reg.UploadVersionRequest(chunk=b"12345"), reg.UploadVersionRequest(chunk=b"678")]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await kernel.registry.UploadVersion(iter(requests))
    assert_domain_error(raised.value, AlreadyExists("8 bytes exist", reason="VERSION_EXISTS"))

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await kernel.registry.UploadVersion(iter([reg.UploadVersionRequest()]))
    assert_internal(raised.value)


async def test_stream_stream(kernel: Kernel) -> None:
    chat = kernel.channel.stream_stream(
        f"/{ECHO}/Chat",
        request_serializer=oip.ModelInferRequest.SerializeToString,
        response_deserializer=oip.ModelInferResponse.FromString,
    )
    requests = [
        oip.ModelInferRequest(id="a"),
        oip.ModelInferRequest(id="b"),
        oip.ModelInferRequest(model_name="deny"),
    ]
    received, error = await drain(chat(iter(requests)))
    assert [r.id for r in received] == ["a", "b"]
    assert_domain_error(error, PermissionDenied("not yours", reason="TENANT_MISMATCH"))


# health and reflection


async def test_health_per_service(kernel: Kernel) -> None:
    async def status(service: str) -> int:
        response = await kernel.health.Check(health_pb2.HealthCheckRequest(service=service))
        return int(response.status)

    for service in ("", INFERENCE, REGISTRY, ECHO):
        assert await status(service) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await status("no.such.Service")
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND

    await kernel.server.set_serving(REGISTRY, False)
    assert await status(REGISTRY) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await status(INFERENCE) == health_pb2.HealthCheckResponse.SERVING
    await kernel.server.set_serving(REGISTRY, True)
    assert await status(REGISTRY) == health_pb2.HealthCheckResponse.SERVING


async def test_service_can_start_not_serving(tmp_path: Path) -> None:
    settings = kernel_settings(tmp_path)
    server, _ = build_server(settings)
    await server.set_serving(INFERENCE, False)
    await server.start()
    try:
        async with open_channel(server.address, settings) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            inference = await stub.Check(health_pb2.HealthCheckRequest(service=INFERENCE))
            whole = await stub.Check(health_pb2.HealthCheckRequest(service=""))
        assert inference.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert whole.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0)


async def test_reflection_lists_services(kernel: Kernel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(kernel.channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    responses = [response async for response in call]
    names = {service.name for service in responses[0].list_services_response.service}
    assert names == {
        INFERENCE,
        REGISTRY,
        ECHO,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


# shutdown


async def test_graceful_shutdown(tmp_path: Path) -> None:
    async with running(kernel_settings(tmp_path)) as kernel:
        watch = kernel.health.Watch(health_pb2.HealthCheckRequest(service=INFERENCE), timeout=30)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

        in_flight = asyncio.create_task(kernel.infer("wait", timeout=30))
        await kernel.inference.started.wait()
        stopping = asyncio.create_task(kernel.server.stop(grace=30))

        # health flips first, and by then the server refuses new calls
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await kernel.stub.ServerLive(oip.ServerLiveRequest(), timeout=5)
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
        assert not in_flight.done()

        # the call started before stop() finishes normally
        kernel.inference.release.set()
        response = await in_flight
        assert response.model_name == "wait"

        watch.cancel()  # the last call in flight: stop() returns long before its grace
        async with asyncio.timeout(10):
            await stopping


async def test_stop_with_no_grace_cancels_in_flight(tmp_path: Path) -> None:
    async with running(kernel_settings(tmp_path)) as kernel:
        in_flight = asyncio.create_task(kernel.infer("forever", timeout=30))
        await kernel.inference.started.wait()
        await kernel.server.stop(0)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await in_flight
        assert kernel.inference.cancelled.is_set()
    assert raised.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


async def _wait_for_serving(server: MeshServer) -> str:
    address = await server.wait_started()
    assert address_file(server.settings.home, server.name).read_text().strip() == address
    return address


async def test_serve_stops_on_event_then_cleans_up_in_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = kernel_settings(tmp_path)
    server, _ = build_server(settings)
    order: list[str] = []

    async def first() -> None:
        order.append("first")

    async def broken() -> None:
        order.append("broken")
        raise OSError("disk on fire")

    async def last() -> None:
        # the server has stopped by the time cleanups run
        assert server.port
        order.append("last")

    stop = asyncio.Event()
    running_task = asyncio.create_task(serve(server, cleanup=[first, broken, last], stop_event=stop))
    address = await _wait_for_serving(server)
    async with open_channel(address, settings) as channel:
        assert (await oip_grpc.GRPCInferenceServiceStub(channel).ServerLive(oip.ServerLiveRequest())).live

    with caplog.at_level(logging.ERROR, logger="services.mesh.server"):
        stop.set()
        await running_task
    assert order == ["first", "broken", "last"]
    assert any("disk on fire" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    assert not address_file(settings.home, server.name).exists()


async def test_serve_stops_on_sigterm_and_restores_handlers(tmp_path: Path) -> None:
    settings = kernel_settings(tmp_path)
    server, _ = build_server(settings)
    cleaned = asyncio.Event()

    async def cleanup() -> None:
        cleaned.set()

    before = signal.getsignal(signal.SIGTERM)
    running_task = asyncio.create_task(serve(server, cleanup=[cleanup]))
    await _wait_for_serving(server)
    # serve() installed its handler before it started the server
    os.kill(os.getpid(), signal.SIGTERM)
    async with asyncio.timeout(20):
        await running_task
    assert cleaned.is_set()
    assert signal.getsignal(signal.SIGTERM) == before


async def test_serve_cancelled_still_shuts_down(tmp_path: Path) -> None:
    settings = kernel_settings(tmp_path)
    server, _ = build_server(settings)
    entered, release = asyncio.Event(), asyncio.Event()
    order: list[str] = []

    async def slow() -> None:
        entered.set()
        await release.wait()
        order.append("slow")

    async def after() -> None:
        order.append("after")

    running_task = asyncio.create_task(serve(server, cleanup=[slow, after]))
    address = await _wait_for_serving(server)
    running_task.cancel()  # cancelling serve() starts the shutdown…
    await entered.wait()
    running_task.cancel()  # …and cancelling it again does not cut a cleanup short
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await running_task
    assert order == ["slow", "after"]
    async with open_channel(address, settings) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await oip_grpc.GRPCInferenceServiceStub(channel).ServerLive(oip.ServerLiveRequest(), timeout=5)
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_port_in_use_fails_to_start(kernel: Kernel) -> None:
    other = MeshServer("second", [], kernel.settings, port=kernel.server.port)
    with pytest.raises(OSError, match="cannot listen"):
        await other.start()


# deadlines


async def test_channel_applies_default_deadline(tmp_path: Path) -> None:
    async with running(kernel_settings(tmp_path, SCOREMESH_DEFAULT_DEADLINE_S="0.2")) as kernel:
        error = await kernel.infer_error("forever")
        assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        # the server dropped the expired work
        async with asyncio.timeout(10):
            await kernel.inference.cancelled.wait()

        # a deadline the caller chose is kept, longer or shorter
        remaining = float((await kernel.infer("remaining", timeout=5)).id)
        assert 0.2 < remaining <= REMAINING_CAP_S


async def test_remaining_timeout(kernel: Kernel) -> None:
    assert float((await kernel.infer("remaining", timeout=30)).id) == REMAINING_CAP_S
    # gRPC sends the timeout rounded up, so a little more than was asked may arrive
    assert 0 < float((await kernel.infer("remaining", timeout=0.5)).id) <= 0.5 + 0.05
    # a caller without a deadline (not a mesh channel) gets the cap
    async with grpc.aio.insecure_channel(kernel.server.address) as plain:
        stub = oip_grpc.GRPCInferenceServiceStub(plain)
        response = await stub.ModelInfer(oip.ModelInferRequest(model_name="remaining"))
    assert float(response.id) == REMAINING_CAP_S


# limits


async def test_message_size_limit_is_equal_on_both_sides(kernel: Kernel) -> None:
    limit = kernel.settings.max_message_bytes

    def request(size: int) -> oip.ModelInferRequest:
        return oip.ModelInferRequest(model_name="echo", raw_input_contents=[b"x" * size])

    # just under the limit passes
    await kernel.stub.ModelInfer(request(limit - 1024))
    # the client refuses to send more
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await kernel.stub.ModelInfer(request(limit))
    assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    # the server refuses to receive more, from a client without the limit
    options = [("grpc.max_send_message_length", 4 * limit)]
    async with grpc.aio.insecure_channel(kernel.server.address, options=options) as unlimited:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await oip_grpc.GRPCInferenceServiceStub(unlimited).ModelInfer(request(limit), timeout=10)
    assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    # and refuses to send more
    error = await kernel.infer_error("big")
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_concurrency_is_bounded(tmp_path: Path) -> None:
    async with running(kernel_settings(tmp_path, SCOREMESH_MAX_CONCURRENT_RPCS="1")) as kernel:
        in_flight = asyncio.create_task(kernel.infer("wait"))
        await kernel.inference.started.wait()
        error = await kernel.infer_error("echo")
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        kernel.inference.release.set()
        await in_flight


# tracing


def _server_span(kernel: Kernel) -> ReadableSpan:
    [span] = [s for s in kernel.spans.get_finished_spans() if s.kind is trace.SpanKind.SERVER]
    return span


async def test_server_span_continues_the_callers_trace(kernel: Kernel) -> None:
    tracer = TracerProvider().get_tracer("test-client")
    with tracer.start_as_current_span("client") as client_span:
        response = await kernel.infer("trace")
    span = _server_span(kernel)
    client = client_span.get_span_context()
    assert span.name == INFER
    assert span.context is not None
    assert span.parent is not None
    assert span.context.trace_id == client.trace_id
    assert span.parent.span_id == client.span_id
    assert span.parent.is_remote
    assert response.id == format(client.trace_id, "032x")  # the handler ran inside the span
    assert dict(span.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": INFERENCE,
        "rpc.method": "ModelInfer",
        "rpc.grpc.status_code": 0,
    }
    assert span.status.status_code is trace.StatusCode.UNSET


async def test_server_span_status(kernel: Kernel) -> None:
    await kernel.infer_error("raise:NotFound")
    span = _server_span(kernel)
    assert (span.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert span.status.status_code is trace.StatusCode.UNSET  # the caller's mistake
    kernel.spans.clear()

    await kernel.infer_error("boom")
    span = _server_span(kernel)
    assert (span.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
    assert span.status.status_code is trace.StatusCode.ERROR
    assert [event.name for event in span.events] == ["exception"]


async def test_trace_context_passes_through_without_sdk(tmp_path: Path) -> None:
    settings = kernel_settings(tmp_path)
    server, _ = build_server(settings)  # the global provider: no SDK in this process
    await server.start()
    try:
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        metadata = (("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)
        async with open_channel(server.address, settings) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            response = await stub.ModelInfer(oip.ModelInferRequest(model_name="trace"), metadata=metadata)
            assert response.id == trace_id
            untraced = await stub.ModelInfer(oip.ModelInferRequest(model_name="trace"))
            assert untraced.id == "0" * 32
    finally:
        await server.stop(0)
