"""The gateway's HTTP server: every REST route the protos annotate, transcoded to gRPC calls on
the mesh's services, behind API keys, scopes and per-key rate limits.

One handler serves every ``/v1`` route: the Router finds the binding, and the call is made
generically from the binding's descriptors, so a new annotated RPC needs no code here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
import grpc.aio
from aiohttp import web
from aiohttp.typedefs import Handler
from google.protobuf import message_factory
from google.protobuf.message import Message
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, StatusCode

from services.gateway import oip_rest
from services.gateway.http_errors import (
    ErrorResponse,
    MethodNotAllowed,
    error_response,
    ndjson_error,
    payload_too_large,
)
from services.gateway.http_rules import HttpBinding
from services.gateway.keys import ApiKey, KeyStore, Scope, bearer_token, require
from services.gateway.openapi import docs_html
from services.gateway.quotas import RateLimiter, UsageRecorder, retry_after_seconds
from services.gateway.transcoding import (
    Router,
    build_request,
    build_upload_messages,
    ndjson_line,
    response_json,
)
from services.mesh import metrics
from services.mesh.channels import mesh_headers
from services.mesh.errors import MeshError, NotFound, ResourceExhausted
from services.mesh.identity import Caller
from services.scoring.oip import pb, pb_grpc

log = logging.getLogger(__name__)

NDJSON: Final = "application/x-ndjson"
JSON: Final = "application/json"
_READ_METHODS: Final = frozenset({"GET"})
CALLER_CACHE_MAX: Final = 10_000
TRACE_ID_HEADER: Final = "X-Trace-Id"
_ROUTE: Final = web.RequestKey("route", str)
_tracer = trace.get_tracer(__name__)
# what a route needs beyond the default (models:read to read, models:write to change)
_SCOPES: Final[Mapping[str, Scope]] = {
    "scoremesh.scoring.v1.Scoring": Scope.SCORE,
    "scoremesh.training.v1.Training": Scope.TRAIN,
    "scoremesh.gateway.v1.Admin": Scope.ADMIN,
}


def required_scope(binding: HttpBinding) -> Scope:
    """The scope a key needs for a route: per service where one is named, else reads need
    models:read and changes models:write."""
    scope = _SCOPES.get(binding.service)
    if scope is not None:
        return scope
    return Scope.MODELS_READ if binding.http_method in _READ_METHODS else Scope.MODELS_WRITE


def _model_of(message: Message) -> str:
    """The model a request is about, for the usage counters ("" when it names none)."""
    for name in ("model", "name", "model_name"):
        if name in message.DESCRIPTOR.fields_by_name:
            value = getattr(message, name)
            if isinstance(value, str):
                return value
    return ""


@dataclass
class Gateway:
    router: Router
    channels: Mapping[str, grpc.aio.Channel]
    """The channel to each service, by full service name."""
    keys: KeyStore
    limiter: RateLimiter
    usage: UsageRecorder
    max_body_bytes: int
    openapi_json: bytes
    call_timeout_s: float
    inference: grpc.aio.Channel | None = None
    """The scoring service, for the Open Inference Protocol's REST binding under /v2: a lean
    channel (no interceptors), so the /v2 routes send the mesh's headers themselves."""
    internal_token: str | None = None
    _callables: dict[tuple[str, str], Any] = field(default_factory=dict)
    _caller_metadata: dict[str, tuple[ApiKey, tuple[tuple[str, str], ...]]] = field(default_factory=dict)

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[_front])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/docs", self.docs)
        app.router.add_route("*", "/v1/{tail:.*}", self.transcode)
        if self.inference is not None:
            oip = OipRoutes(self, pb_grpc.GRPCInferenceServiceStub(self.inference))
            app.router.add_get("/v2/health/live", oip.live)
            app.router.add_get("/v2/health/ready", oip.ready)
            app.router.add_get("/v2", oip.server_metadata)
            for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
                app.router.add_get(prefix, oip.model_metadata)
                app.router.add_get(prefix + "/ready", oip.model_ready)
                app.router.add_post(prefix + "/infer", oip.infer)
        return app

    # the gateway's own routes

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": metrics.CONTENT_TYPE})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self.openapi_json, content_type=JSON)

    async def docs(self, request: web.Request) -> web.Response:
        return web.Response(text=docs_html("/openapi.json"), content_type="text/html")

    # every annotated RPC

    async def transcode(self, request: web.Request) -> web.StreamResponse:
        try:
            match = self.router.match(request.method, request.raw_path.split("?", 1)[0])
            binding = match.binding
            request[_ROUTE] = binding.path.text
            span = trace.get_current_span()
            if span.is_recording():
                span.update_name(f"{request.method} {binding.path.text}")
                span.set_attributes({"http.route": binding.path.text, "rpc.method": binding.grpc_path})
            key = await self.admit(request, required_scope(binding))
            metadata = self.caller_metadata(key)
            query = list(request.query.items())
            if binding.client_streaming:
                upload = build_upload_messages(
                    binding,
                    match.path_vars,
                    query,
                    self._body_chunks(request),
                    content_type=request.headers.get("Content-Type"),
                )
                self.usage.record(key, match.path_vars.get("metadata.model", ""))
                response = await self._stream_unary(binding)(
                    upload, metadata=metadata, timeout=self.call_timeout_s
                )
                return _json(response_json(binding, response))
            body = await self.read_body(request)
            message = build_request(
                binding, match.path_vars, query, body, request.headers.get("Content-Type")
            )
            self.usage.record(key, _model_of(message))
            if binding.server_streaming:
                return await self._stream(request, binding, message, metadata)
            response = await self._unary(binding)(message, metadata=metadata, timeout=self.call_timeout_s)
            return _json(response_json(binding, response))
        except _TooLarge as error:
            return _error(payload_too_large(error.limit))
        except _RateLimited as error:
            response = error_response(error)
            headers = {**response.headers, "Retry-After": str(error.retry_after_s)}
            return _error(ErrorResponse(response.status, response.body, headers, response.content_type))
        except (MeshError, grpc.aio.AioRpcError) as error:
            return _error(error_response(error))

    async def admit(self, request: web.Request, scope: Scope) -> ApiKey:
        """The caller's key, once it is valid, holds ``scope`` and is within its rate."""
        key = await self.keys.authenticate(bearer_token(request.headers.get("Authorization")))
        require(key, scope)
        wait = self.limiter.take(key)
        if wait > 0:
            raise _RateLimited(key.id, retry_after_seconds(wait))
        return key

    def caller_metadata(self, key: ApiKey) -> tuple[tuple[str, str], ...]:
        """The metadata that makes a call act for ``key``'s tenant, as ``key``: made once per
        key object (the key store hands out the same object while it trusts its cache)."""
        cached = self._caller_metadata.get(key.id)
        if cached is None or cached[0] is not key:
            if len(self._caller_metadata) >= CALLER_CACHE_MAX:
                self._caller_metadata.clear()
            caller = Caller(tenant=key.tenant, principal=key.id, scopes=frozenset(key.scopes))
            cached = (key, caller.metadata())
            self._caller_metadata[key.id] = cached
        return cached[1]

    def inference_metadata(self, key: ApiKey) -> tuple[tuple[str, str], ...]:
        """The caller's metadata plus what the lean /v2 channel's interceptors would add."""
        return (*self.caller_metadata(key), *mesh_headers(self.internal_token).items())

    async def read_body(self, request: web.Request) -> bytes | None:
        if not request.can_read_body:
            return None
        length = request.content_length
        if length is not None:  # the common case: one read of the declared length
            if length > self.max_body_bytes:
                raise _TooLarge(self.max_body_bytes)
            try:
                return await request.content.readexactly(length)
            except asyncio.IncompleteReadError as error:  # the client went away: what came
                return error.partial
        # chunked: gather what arrives, within the limit
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge(self.max_body_bytes)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _body_chunks(self, request: web.Request) -> AsyncIterator[bytes]:
        async for chunk in request.content.iter_chunked(1 << 20):
            yield chunk

    async def _stream(
        self, request: web.Request, binding: HttpBinding, message: Message, metadata: Any
    ) -> web.StreamResponse:
        call = self._unary_stream(binding)(message, metadata=metadata, timeout=self.call_timeout_s)
        response: web.StreamResponse | None = None
        try:
            async for item in call:
                if response is None:
                    response = web.StreamResponse(headers={"Content-Type": NDJSON, **_trace_header()})
                    await response.prepare(request)
                await response.write(ndjson_line(binding, item))
        except grpc.aio.AioRpcError as error:
            if response is None:
                return _error(error_response(error))
            await response.write(ndjson_error(error))
        if response is None:  # an empty stream
            response = web.StreamResponse(headers={"Content-Type": NDJSON, **_trace_header()})
            await response.prepare(request)
        await response.write_eof()
        return response

    # generic calls, from the descriptors

    def _unary(self, binding: HttpBinding) -> Any:
        return self._callable(binding, "unary_unary")

    def _unary_stream(self, binding: HttpBinding) -> Any:
        return self._callable(binding, "unary_stream")

    def _stream_unary(self, binding: HttpBinding) -> Any:
        return self._callable(binding, "stream_unary")

    def _callable(self, binding: HttpBinding, kind: str) -> Any:
        """The channel's multi-callable for a route, made once: building it (and the response
        class) per request would repeat work on the hot path."""
        key = (binding.grpc_path, kind)
        callable_ = self._callables.get(key)
        if callable_ is None:
            factory = getattr(self.channels[binding.service], kind)
            callable_ = factory(
                binding.grpc_path,
                request_serializer=_serialize,
                response_deserializer=message_factory.GetMessageClass(binding.output_type).FromString,
            )
            self._callables[key] = callable_
        return callable_


@dataclass
class OipRoutes:
    """The Open Inference Protocol's REST binding (KServe v2), so that stock
    ``tritonclient.http`` works through the gateway: each route is one call of
    ``inference.GRPCInferenceService`` on the scoring service, as the key's tenant. Health
    needs no key; everything else needs the ``score`` scope."""

    gateway: Gateway
    stub: Any

    async def live(self, request: web.Request) -> web.Response:
        call = self.stub.ServerLive(pb.ServerLiveRequest(), metadata=self._mesh_headers(), timeout=5)
        return await self._health(call, "live")

    async def ready(self, request: web.Request) -> web.Response:
        call = self.stub.ServerReady(pb.ServerReadyRequest(), metadata=self._mesh_headers(), timeout=5)
        return await self._health(call, "ready")

    def _mesh_headers(self) -> tuple[tuple[str, str], ...]:
        return tuple(mesh_headers(self.gateway.internal_token).items())

    async def _health(self, call: Any, field: str) -> web.Response:
        try:
            answer = await call
        except grpc.aio.AioRpcError:
            return web.Response(status=oip_rest.NOT_READY_STATUS)
        ok = bool(getattr(answer, field))
        return web.Response(status=oip_rest.READY_STATUS if ok else oip_rest.NOT_READY_STATUS)

    async def server_metadata(self, request: web.Request) -> web.Response:
        try:
            await self.gateway.admit(request, Scope.SCORE)
            answer = await self.stub.ServerMetadata(
                pb.ServerMetadataRequest(), metadata=self._mesh_headers(), timeout=self.gateway.call_timeout_s
            )
            return _json(oip_rest.server_metadata_json(answer))
        except (MeshError, grpc.aio.AioRpcError) as error:
            return _error(error_response(error, oip=True))

    async def model_metadata(self, request: web.Request) -> web.Response:
        try:
            metadata = await self._caller(request)
            call = pb.ModelMetadataRequest(
                name=request.match_info["model"], version=request.match_info.get("version", "")
            )
            answer = await self.stub.ModelMetadata(
                call, metadata=metadata, timeout=self.gateway.call_timeout_s
            )
            return _json(oip_rest.model_metadata_json(answer))
        except (MeshError, grpc.aio.AioRpcError) as error:
            return _error(error_response(error, oip=True))

    async def model_ready(self, request: web.Request) -> web.Response:
        try:
            metadata = await self._caller(request)
            call = pb.ModelReadyRequest(
                name=request.match_info["model"], version=request.match_info.get("version", "")
            )
            answer = await self.stub.ModelReady(call, metadata=metadata, timeout=self.gateway.call_timeout_s)
            return web.Response(status=oip_rest.READY_STATUS if answer.ready else oip_rest.NOT_READY_STATUS)
        except (MeshError, grpc.aio.AioRpcError) as error:
            return _error(error_response(error, oip=True))

    async def infer(self, request: web.Request) -> web.Response:
        try:
            key = await self.gateway.admit(request, Scope.SCORE)
            body = await self.gateway.read_body(request) or b""
            model, version = _model_and_version(request)
            parsed = oip_rest.parse_infer_request(
                model,
                version,
                body,
                oip_rest.header_length_of(request.headers.get(oip_rest.HEADER_LENGTH)),
                self.gateway.max_body_bytes,
            )
            scored = 0
            try:
                answer = await self.stub.ModelInfer(
                    parsed.request,
                    metadata=self.gateway.inference_metadata(key),
                    timeout=self.gateway.call_timeout_s,
                )
                scored = oip_rest.rows_of(parsed.request)
            finally:
                # a request that reached scoring counts; its rows only once they were scored
                self.gateway.usage.record(key, model, rows=scored)
            payload, headers = oip_rest.infer_response_body(answer, parsed.outputs)
            return web.Response(body=payload, headers=headers)
        except _TooLarge as error:
            return _error(payload_too_large(error.limit, oip=True))
        except (MeshError, grpc.aio.AioRpcError) as error:
            return _error(error_response(error, oip=True))

    async def _caller(self, request: web.Request) -> Any:
        return self.gateway.inference_metadata(await self.gateway.admit(request, Scope.SCORE))


def _model_and_version(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


class _TooLarge(ResourceExhausted):
    """A body over the limit: 413, not the 429 RESOURCE_EXHAUSTED maps to."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the body is larger than {limit} bytes", reason="BODY_TOO_LARGE")
        self.limit = limit


class _RateLimited(ResourceExhausted):
    """A key over its rate: 429 with Retry-After."""

    def __init__(self, key_id: str, retry_after_s: int) -> None:
        super().__init__(
            f"key {key_id} is over its rate limit; retry in {retry_after_s} s",
            reason="RATE_LIMITED",
            metadata={"retry_after_s": str(retry_after_s)},
        )
        self.retry_after_s = retry_after_s


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _json(body: bytes) -> web.Response:
    return web.Response(body=body, content_type=JSON)


@web.middleware
async def _front(request: web.Request, handler: Handler) -> web.StreamResponse:
    """What every request goes through, in one layer (each middleware costs a coroutine per
    request): a server span continuing the caller's W3C ``traceparent`` (the calls the
    handler makes carry it on; the response names the trace in ``X-Trace-Id``), the HTTP
    metrics, and aiohttp's own 404 and 405 turned into the gateway's JSON errors."""
    resource = request.match_info.route.resource
    # unmatched paths share one label: a label per path would grow without bound
    route = resource.canonical if resource is not None else "unmatched"
    started = time.perf_counter()
    with _tracer.start_as_current_span(
        f"{request.method} {route}",
        context=propagate.extract(request.headers),
        kind=SpanKind.SERVER,
        attributes={"http.request.method": request.method, "url.path": request.path, "http.route": route},
    ) as span:
        refusal = request.match_info.http_exception
        refused = _routing_error(request, refusal) if refusal is not None else None
        response = refused if refused is not None else await handler(request)
        if span.is_recording():
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(StatusCode.ERROR)
        if not response.prepared:
            response.headers.update(_trace_header())
        route = request.get(_ROUTE, route)  # the RPC's template, for the generic /v1 route
        _http_meters(route, response.status).observe(time.perf_counter() - started)
        return response


@dataclass(frozen=True, slots=True)
class _HttpMeters:
    requests: Any
    duration: Any

    def observe(self, seconds: float) -> None:
        self.requests.inc()
        self.duration.observe(seconds)


@functools.cache
def _http_meters(route: str, status: int) -> _HttpMeters:
    # routes are the app's (bounded) and statuses few: the labelled children are looked up once
    return _HttpMeters(metrics.HTTP_REQUESTS.labels(route, str(status)), metrics.HTTP_DURATION.labels(route))


def _trace_header() -> dict[str, str]:
    context = trace.get_current_span().get_span_context()
    return {TRACE_ID_HEADER: format(context.trace_id, "032x")} if context.is_valid else {}


def _routing_error(request: web.Request, refusal: web.HTTPException) -> web.Response | None:
    """aiohttp's own 404 and 405, for a path no route has (``/v2/nowhere``) or a method a route
    lacks (``POST /v2/health/live``), as the gateway's JSON error, like every other error."""
    path = request.raw_path.split("?", 1)[0]
    oip = path == "/v2" or path.startswith("/v2/")
    if isinstance(refusal, web.HTTPMethodNotAllowed):
        allow = sorted(refusal.allowed_methods)
        return _error(error_response(MethodNotAllowed(request.method, path, allow), oip=oip))
    if isinstance(refusal, web.HTTPNotFound):
        missing = NotFound(
            f"no route for {request.method} {path}", reason="ROUTE_NOT_FOUND", metadata={"path": path}
        )
        return _error(error_response(missing, oip=oip))
    return None


def _error(response: ErrorResponse) -> web.Response:
    return web.Response(
        status=response.status,
        body=response.body,
        headers=dict(response.headers),
        content_type=response.content_type,
    )


__all__ = ["Gateway", "required_scope"]
