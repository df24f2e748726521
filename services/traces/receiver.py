"""A local OTLP receiver: OTLP/gRPC (``TraceService/Export``) and OTLP/HTTP (``POST
/v1/traces``, protobuf or JSON, gzip or not) on 127.0.0.1, both writing to the span store.

The two transports are thin: each hands the body to one :class:`TraceIntake`, which decodes
it off the event loop (``services.traces.otlp``) and waits for the :class:`SpanWriter` to
commit it. Bad payloads are answered INVALID_ARGUMENT over gRPC and 400 over HTTP, with the
mesh's ``google.rpc.Status`` body in JSON (``services.gateway.http_errors``); spans with bad
ids are dropped and counted in OTLP's partial success. The receiver never traces itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Final

import grpc
import grpc.aio
from aiohttp import web
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from services.gateway.http_errors import (
    MethodNotAllowed,
    PayloadTooLarge,
    UnsupportedMediaType,
    error_response,
)
from services.mesh.errors import MeshError, NotFound
from services.mesh.server import MeshServer, Registration
from services.mesh.settings import MeshSettings
from services.mesh.status import RemoteError
from services.traces.otlp import (
    DecodedExport,
    decode_export,
    request_from_json,
    request_from_protobuf,
    response_for,
    response_to_json,
)
from services.traces.settings import TracesSettings
from services.traces.writer import SpanWriter

__all__ = [
    "HOST",
    "TRACES_PATH",
    "TRACE_SERVICE",
    "OtlpReceiver",
    "TraceIntake",
    "http_application",
]

log = logging.getLogger(__name__)

HOST: Final = "127.0.0.1"
"""The receiver listens on loopback only: spans carry model names, queries and tenants."""
TRACE_SERVICE: Final = "opentelemetry.proto.collector.trace.v1.TraceService"
TRACES_PATH: Final = "/v1/traces"
"""OTLP/HTTP's path for traces, where exporters (Triton's too) append it to the endpoint."""
PROTOBUF_TYPES: Final = frozenset({"application/x-protobuf", "application/protobuf"})
JSON_TYPE: Final = "application/json"
MAX_REQUEST_BYTES: Final = 16 * 1024**2
"""The largest export taken, decompressed, over either transport (the OpenTelemetry
Collector's default is 4 MiB over gRPC; SDK batches of 512 spans stay far below)."""


class TraceIntake:
    """The receiver's one data plane: an export's body in, its response out, once the spans
    are committed."""

    def __init__(self, writer: SpanWriter) -> None:
        self._writer = writer

    async def export(self, body: bytes, *, as_json: bool) -> ExportTraceServiceResponse:
        """InvalidArgument for a body that is not an export; Unavailable when the store
        cannot take it now (exporters retry)."""
        decoded = await asyncio.to_thread(_decode, body, as_json)
        await self._writer.write(decoded.spans)
        if decoded.rejected:
            log.warning("rejected %d spans: %s", decoded.rejected, decoded.error_message)
        return response_for(decoded)


def _decode(body: bytes, as_json: bool) -> DecodedExport:
    request = request_from_json(body) if as_json else request_from_protobuf(body)
    return decode_export(request)


# OTLP/gRPC


class TraceServiceServicer:
    """``TraceService/Export`` over the intake. Registered with a bytes-in handler so that a
    body that does not parse is INVALID_ARGUMENT (the mesh's interceptor maps the error),
    where grpc's own deserializer would fail it as INTERNAL."""

    def __init__(self, intake: TraceIntake) -> None:
        self._intake = intake

    async def Export(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        response = await self._intake.export(request, as_json=False)
        return response.SerializeToString()


def _add_trace_service(servicer: TraceServiceServicer, server: grpc.aio.Server) -> None:
    handler = grpc.unary_unary_rpc_method_handler(servicer.Export)  # bytes in, bytes out
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(TRACE_SERVICE, {"Export": handler}),)
    )


# OTLP/HTTP


def http_application(intake: TraceIntake, *, max_body_bytes: int = MAX_REQUEST_BYTES) -> web.Application:
    """``POST /v1/traces`` with ``application/x-protobuf`` or ``application/json`` (answered
    in the same type); every error as a JSON ``google.rpc.Status``."""

    async def traces(request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return _error(MethodNotAllowed(request.method, request.path, ["POST"]))
        content_type = request.content_type
        if content_type in PROTOBUF_TYPES:
            as_json = False
        elif content_type == JSON_TYPE:
            as_json = True
        else:
            return _error(UnsupportedMediaType(content_type, "application/x-protobuf or application/json"))
        try:
            body = await request.read()  # aiohttp undoes a gzip or deflate Content-Encoding
        except web.HTTPRequestEntityTooLarge:
            return _error(PayloadTooLarge(max_body_bytes))
        try:
            response = await intake.export(body, as_json=as_json)
        except MeshError as error:
            return _error(error)
        except Exception:
            log.exception("OTLP/HTTP export failed")
            return _error(RemoteError("the receiver failed to take the export", code_name="INTERNAL"))
        if as_json:
            return web.Response(body=response_to_json(response), content_type=JSON_TYPE)
        return web.Response(body=response.SerializeToString(), content_type="application/x-protobuf")

    async def elsewhere(request: web.Request) -> web.StreamResponse:
        return _error(NotFound(f"no such path: {request.path}; OTLP/HTTP traces go to POST {TRACES_PATH}"))

    application = web.Application(client_max_size=max_body_bytes)
    application.router.add_route("*", TRACES_PATH, traces)
    application.router.add_route("*", "/{tail:.*}", elsewhere)
    return application


def _error(error: MeshError) -> web.Response:
    response = error_response(error)
    return web.Response(
        status=response.status,
        body=response.body,
        headers=response.headers,
        content_type=response.content_type,
    )


class OtlpReceiver:
    """Both transports and the writer behind them, on 127.0.0.1.

    ``start()`` opens the store and binds the ports (``settings.grpc_port`` and
    ``http_port``; 0: the OS picks, read them back from :attr:`grpc_address` and
    :attr:`http_address`). ``stop()`` stops taking exports, lets those in flight finish for
    ``mesh.shutdown_grace_s``, commits them and closes the store. Also an async context
    manager.
    """

    def __init__(self, settings: TracesSettings, mesh: MeshSettings) -> None:
        self.settings = settings
        self._writer = SpanWriter(
            settings.store_path, max_spans=settings.max_spans, max_age_s=settings.max_age_s
        )
        intake = TraceIntake(self._writer)
        self._grace_s = mesh.shutdown_grace_s
        self._grpc = MeshServer(
            "otlp-receiver",
            [Registration(TRACE_SERVICE, _add_trace_service, TraceServiceServicer(intake))],
            # exporters carry no mesh token nor certificate (the receiver listens on loopback
            # only), and the receiver must not trace its own calls
            dataclasses.replace(
                mesh, internal_token=None, tls=None, health_port=None, max_message_bytes=MAX_REQUEST_BYTES
            ),
            host=HOST,
            port=settings.grpc_port,
            tracer_provider=trace.NoOpTracerProvider(),
        )
        self._http = web.AppRunner(http_application(intake), access_log=None, shutdown_timeout=self._grace_s)
        self._http_port: int | None = None
        self._http_set_up = False
        self._stopping: asyncio.Task[None] | None = None

    @property
    def grpc_address(self) -> str:
        """``127.0.0.1:port`` of OTLP/gRPC; only after start()."""
        return self._grpc.address

    @property
    def http_address(self) -> str:
        """``127.0.0.1:port`` of OTLP/HTTP; only after start()."""
        if self._http_port is None:
            raise RuntimeError("the OTLP receiver has not started")
        return f"{HOST}:{self._http_port}"

    async def start(self) -> None:
        await self._writer.start()
        try:
            await self._grpc.start()
            await self._http.setup()
            self._http_set_up = True
            await web.TCPSite(self._http, HOST, self.settings.http_port).start()
            self._http_port = self._http.addresses[0][1]
        except BaseException:
            await self.stop()
            raise
        log.info(
            "OTLP receiver on %s (gRPC) and http://%s%s, storing in %s",
            self.grpc_address,
            self.http_address,
            TRACES_PATH,
            self.settings.store_path,
        )

    async def stop(self) -> None:
        """Safe to call more than once; finishes even if the caller is cancelled."""
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop(), name="stop-otlp-receiver")
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        steps = [self._grpc.stop(self._grace_s)]
        if self._http_set_up:
            steps.append(self._http.cleanup())
        try:
            for outcome in await asyncio.gather(*steps, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    log.error("stopping the OTLP receiver failed", exc_info=outcome)
        finally:
            await self._writer.close()

    async def __aenter__(self) -> OtlpReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
