"""The server interceptor every mesh service runs: error mapping, one span and one log line
per call, and the request id that log lines carry.

It wraps each method's handler once (the wrapped handler is cached per method), so a call
pays for one extra coroutine frame, a non-recording span when no SDK is installed, and a
couple of context-variable sets: see the kernel's report for the measured cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import inspect
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import grpc
import grpc.aio
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind
from opentelemetry.trace.status import Status, StatusCode

from services.mesh import metrics
from services.mesh.errors import MeshError, Unauthenticated
from services.mesh.identity import INTERNAL_HEADER
from services.mesh.status import abort, status_code
from services.mesh.telemetry import REQUEST_ID

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    _Context = grpc.aio.ServicerContext[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor
    _Context = grpc.aio.ServicerContext

__all__ = ["REQUEST_ID_HEADER", "MeshServerInterceptor", "remaining_timeout"]

log = logging.getLogger(__name__)

REQUEST_ID_HEADER: Final = "x-request-id"
"""Invocation metadata a caller (the gateway) may set to choose the request id."""

# codes that say the server failed rather than the caller; they log at ERROR and mark spans
_SERVER_FAULTS: Final = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
# OpenTelemetry's gRPC conventions: a server span is an error for these codes only
_SPAN_ERRORS: Final = _SERVER_FAULTS | {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}
_MAX_REQUEST_ID: Final = 128
_OPEN_SERVICES: Final = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# a generic handler may answer any method name; don't let the cache grow without bound
_MAX_CACHED_METHODS: Final = 4096

# the keys the configured propagators read (OTEL_PROPAGATORS is applied when opentelemetry
# is imported, so they are fixed by now): traceparent, tracestate and baggage by default
_PROPAGATION_FIELDS: Final = frozenset(propagate.get_global_textmap().fields)

_REQUEST_PREFIX: Final = os.urandom(4).hex()
_request_numbers = itertools.count(1)


def remaining_timeout(context: _Context, cap: float) -> float:
    """Seconds left of the inbound call's deadline, at most ``cap``; ``cap`` itself when the
    caller sent no deadline. Pass it as the ``timeout`` of every call made on the caller's
    behalf, so that expired work is dropped at every hop (0 makes the next call fail at once)."""
    remaining = context.time_remaining()
    if remaining is None:
        return cap
    return max(0.0, min(remaining, cap))


class _Call:
    """What one call needs between its start and its end."""

    __slots__ = ("authorized", "context_token", "request_token", "span", "start")

    def __init__(
        self,
        span: trace.Span,
        context_token: contextvars.Token[otel_context.Context] | None,
        request_token: contextvars.Token[str | None],
        start: float,
        authorized: bool,
    ) -> None:
        self.span = span
        self.context_token = context_token
        self.request_token = request_token
        self.start = start
        self.authorized = authorized


class _Method:
    """The per-method half of the interceptor: names, span attributes, the begin/end of a call."""

    __slots__ = ("attributes", "meters", "name", "token", "tracer")

    def __init__(self, name: str, tracer: trace.Tracer, token: str | None) -> None:
        self.name = name
        self.tracer = tracer
        # health and reflection answer anyone: probes and tools carry no mesh secret
        self.token = None if name.startswith(_OPEN_SERVICES) else token
        service, _, method = name.lstrip("/").rpartition("/")
        self.attributes: dict[str, str] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        # the labelled children per status code, looked up once
        self.meters: dict[grpc.StatusCode, tuple[Any, Any]] = {}

    def _observe(self, code: grpc.StatusCode, seconds: float) -> None:
        meters = self.meters.get(code)
        if meters is None:
            labels = (self.attributes["rpc.service"], self.attributes["rpc.method"], code.name)
            meters = (metrics.RPC_REQUESTS.labels(*labels), metrics.RPC_DURATION.labels(*labels))
            self.meters[code] = meters
        meters[0].inc()
        meters[1].observe(seconds)

    def begin(self, context: _Context) -> _Call:
        start = time.perf_counter()
        parent: otel_context.Context | None = None
        request_id: str | None = None
        presented: str | None = None
        metadata = context.invocation_metadata()
        if metadata:
            carrier: dict[str, str] | None = None
            for key, value in metadata:
                if key == INTERNAL_HEADER and isinstance(value, str):
                    presented = value
                elif key in _PROPAGATION_FIELDS:
                    if carrier is None:
                        carrier = {}
                    carrier[key] = value  # type: ignore[assignment]
                elif key == REQUEST_ID_HEADER and isinstance(value, str):
                    request_id = value[:_MAX_REQUEST_ID]
            if carrier is not None:
                parent = propagate.extract(carrier)
        span = self.tracer.start_span(self.name, parent, SpanKind.SERVER, self.attributes)
        # without an SDK and without a caller's context there is nothing to make current
        token = None
        if parent is not None or span.is_recording():
            token = otel_context.attach(trace.set_span_in_context(span, parent))
        if request_id is None:
            request_id = f"{_REQUEST_PREFIX}-{next(_request_numbers):x}"
        authorized = self.token is None or (
            presented is not None and hmac.compare_digest(presented.encode(), self.token.encode())
        )
        return _Call(span, token, REQUEST_ID.set(request_id), start, authorized)

    async def refuse(self, call: _Call, context: _Context) -> None:
        """Ends a call that lacks the mesh's internal token with UNAUTHENTICATED."""
        refusal = Unauthenticated(
            "calls inside the mesh must carry its internal token; clients go through the gateway",
            reason="INTERNAL_TOKEN_REQUIRED",
        )
        await self.failed(call, context, refusal)

    def end(self, call: _Call, code: grpc.StatusCode, message: str, exc: BaseException | None = None) -> None:
        span = call.span
        elapsed = time.perf_counter() - call.start
        self._observe(code, elapsed)
        elapsed_ms = elapsed * 1000.0
        if span.is_recording():
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code in _SPAN_ERRORS:
                span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}"))
            if exc is not None and not isinstance(exc, asyncio.CancelledError | grpc.aio.AbortError):
                span.record_exception(exc)
        if code is grpc.StatusCode.OK:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("OK %s %.1f ms", self.name, elapsed_ms)
        else:
            self._log_failure(code, message, elapsed_ms, exc)
        span.end()
        if call.context_token is not None:
            otel_context.detach(call.context_token)
        REQUEST_ID.reset(call.request_token)

    def _log_failure(
        self, code: grpc.StatusCode, message: str, elapsed_ms: float, exc: BaseException | None
    ) -> None:
        extra = {"rpc_method": self.name, "rpc_code": code.name, "duration_ms": round(elapsed_ms, 3)}
        if code in _SERVER_FAULTS:
            level = logging.ERROR
        elif code is grpc.StatusCode.CANCELLED:
            level = logging.INFO  # the caller went away; routine for long-lived streams
        else:
            level = logging.WARNING
        unexpected = exc is not None and not isinstance(
            exc, MeshError | asyncio.CancelledError | grpc.aio.AbortError
        )
        log.log(
            level,
            "%s %s %.1f ms: %s",
            code.name,
            self.name,
            elapsed_ms,
            message,
            exc_info=exc if unexpected else None,
            extra=extra,
        )

    async def failed(self, call: _Call, context: _Context, exc: BaseException) -> None:
        """Ends a call whose handler raised. Raises AbortError for the errors it converts;
        returns for those the caller must re-raise untouched."""
        if isinstance(exc, MeshError):
            self.end(call, status_code(exc), f"{exc.message} [{exc.reason}]", exc)
            await abort(context, exc)
        elif isinstance(exc, grpc.aio.AbortError):
            # the handler chose its status itself: keep it
            self.end(call, context.code() or grpc.StatusCode.UNKNOWN, context.details() or "", exc)
        elif isinstance(exc, asyncio.CancelledError):
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            self.end(call, code, "cancelled", exc)
        elif isinstance(exc, Exception):
            request_id = REQUEST_ID.get()
            self.end(call, grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}", exc)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error; see server logs (request id {request_id})"
            )
        else:  # KeyboardInterrupt, SystemExit, GeneratorExit
            self.end(call, grpc.StatusCode.CANCELLED, type(exc).__name__, exc)

    def succeeded(self, call: _Call, context: _Context) -> None:
        # a handler may have set a code with context.set_code() and returned normally
        code = context.code()
        if code is None or code is grpc.StatusCode.OK:
            self.end(call, grpc.StatusCode.OK, "")
        else:
            self.end(call, code, context.details() or "")


_Behaviour = Callable[[Any, _Context], Any]


def _wrap_coroutine(method: _Method, behaviour: Callable[[Any, _Context], Awaitable[Any]]) -> _Behaviour:
    # serves unary responses, and streams written with context.write()
    async def observed(request: Any, context: _Context) -> Any:
        call = method.begin(context)
        if not call.authorized:
            await method.refuse(call, context)
        try:
            response = await behaviour(request, context)
        except BaseException as exc:
            await method.failed(call, context, exc)
            raise
        method.succeeded(call, context)
        return response

    return observed


def _wrap_async_generator(
    method: _Method, behaviour: Callable[[Any, _Context], AsyncIterator[Any]]
) -> _Behaviour:
    async def observed(request: Any, context: _Context) -> AsyncIterator[Any]:
        call = method.begin(context)
        if not call.authorized:
            await method.refuse(call, context)
        try:
            # aclosing: when the client goes away, the handler's own finally blocks run now
            async with contextlib.aclosing(behaviour(request, context)) as responses:  # type: ignore[type-var]
                async for response in responses:
                    yield response
        except BaseException as exc:
            await method.failed(call, context, exc)
            raise
        method.succeeded(call, context)

    return observed


def _wrap(behaviour: Any, method: _Method) -> Any:
    if inspect.isasyncgenfunction(behaviour):
        return _wrap_async_generator(method, behaviour)
    if inspect.iscoroutinefunction(behaviour):
        return _wrap_coroutine(method, behaviour)
    # grpc.aio runs a synchronous handler in its thread pool; the mesh has none, so it
    # passes unobserved rather than being run on the event loop
    return behaviour


class MeshServerInterceptor(_ServerInterceptor):
    """Maps errors, opens one SERVER span and writes one log line per failed call.

    * A :class:`MeshError` becomes its gRPC code with ``google.rpc`` details (status.py).
    * Any other exception becomes INTERNAL with a generic message naming the request id,
      and is logged with its traceback; clients never see exception text.
    * ``asyncio.CancelledError`` and ``grpc.aio.AbortError`` propagate untouched, so a
      handler that called ``context.abort`` keeps its status.
    * The span (named after the full method, kind SERVER, ``rpc.*`` attributes) continues
      the caller's W3C context from ``traceparent``/``tracestate`` metadata, through the
      OpenTelemetry API only; ``tracer_provider`` defaults to the global one.
    * With ``internal_token``, a call without that token in ``x-scoremesh-internal`` is
      refused with UNAUTHENTICATED before its handler runs (health and reflection excepted).
    * Failed calls log at WARNING (ERROR for server faults, INFO when the caller cancelled);
      successes at DEBUG.
    """

    def __init__(
        self, *, tracer_provider: trace.TracerProvider | None = None, internal_token: str | None = None
    ) -> None:
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        self._internal_token = internal_token
        self._handlers: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]
        ] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: grpc answers UNIMPLEMENTED
        name = handler_call_details.method
        cached = self._handlers.get(name)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap_handler(name, handler)
        if len(self._handlers) < _MAX_CACHED_METHODS:
            self._handlers[name] = (handler, wrapped)
        return wrapped

    def _wrap_handler(
        self, name: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = _Method(name, self._tracer, self._internal_token)
        request_streaming, response_streaming = handler.request_streaming, handler.response_streaming
        if request_streaming and response_streaming:
            factory, behaviour = grpc.stream_stream_rpc_method_handler, handler.stream_stream
        elif request_streaming:
            factory, behaviour = grpc.stream_unary_rpc_method_handler, handler.stream_unary
        elif response_streaming:
            factory, behaviour = grpc.unary_stream_rpc_method_handler, handler.unary_stream
        else:
            factory, behaviour = grpc.unary_unary_rpc_method_handler, handler.unary_unary
        return factory(_wrap(behaviour, method), handler.request_deserializer, handler.response_serializer)
