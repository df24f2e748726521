"""The one way a mesh process opens a gRPC channel to another.

Channels are long-lived: open each one at start-up in the composition root, share it among
every stub and task that talks to that target, and close it at shutdown (after the server
stopped). Opening a channel per call throws away the connection, its keepalive state and the
retry throttling that the service config below relies on.

Every channel opened here:

* limits messages to ``settings.max_message_bytes`` both ways, as every mesh server does;
* sends keepalive pings (every 30 s, 10 s to answer, also while idle) so that a dead peer
  or a silently dropped connection is noticed before a call waits on it; mesh servers
  accept pings this often (see ``server.py``), a foreign server may need telling;
* retries calls that fail with UNAVAILABLE, and only those, for the named services: at
  most 4 attempts, backing off from 0.1 s to 2 s (gRPC retries only calls that can safely
  be replayed: nothing was received from the server yet);
* gives each call without a timeout ``settings.default_deadline_s``;
* sends the current OpenTelemetry context (``traceparent``/``tracestate``) as metadata;
* speaks mutual TLS when ``settings.tls`` is set (``SCOREMESH_TLS_*``, see ``tls.py``), and
  plaintext otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import grpc
import grpc.aio
from opentelemetry import propagate

from services.mesh.identity import INTERNAL_HEADER
from services.mesh.settings import MeshSettings
from services.mesh.tls import open_grpc_channel, tls_channel_options

if TYPE_CHECKING:
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _StreamStream = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor
    _StreamStream = grpc.aio.StreamStreamClientInterceptor

__all__ = [
    "KEEPALIVE_TIMEOUT_MS",
    "KEEPALIVE_TIME_MS",
    "MeshClientInterceptor",
    "channel_options",
    "client_interceptors",
    "open_channel",
    "service_config",
]

KEEPALIVE_TIME_MS: Final = 30_000
KEEPALIVE_TIMEOUT_MS: Final = 10_000

RETRY_POLICY: Final = {
    "maxAttempts": 4,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config(retry_services: Sequence[str]) -> str:
    """The service config JSON that retries UNAVAILABLE for each named service."""
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": name} for name in retry_services],
                    "retryPolicy": RETRY_POLICY,
                }
            ]
        }
    )


def channel_options(settings: MeshSettings, *, retry_services: Sequence[str] = ()) -> list[tuple[str, Any]]:
    """The channel arguments of :func:`open_channel`, for clients built outside it."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # by default a client sends only 2 pings without data in between; idle channels
        # would stop checking their connection after a minute
        ("grpc.http2.max_pings_without_data", 0),
        # also keeps gRPC's transparent retries of calls that never left the client
        ("grpc.enable_retries", 1),
        *tls_channel_options(settings.tls),
    ]
    if retry_services:
        options.append(("grpc.service_config", service_config(retry_services)))
    return options


def mesh_headers(internal_token: str | None) -> dict[str, str]:
    """What every call inside the mesh carries: the current trace context and the mesh's
    internal token. The interceptors of :func:`open_channel` add it; a hot path that calls
    on a channel without them (:func:`open_lean_channel`) adds it itself."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if internal_token:
        carrier[INTERNAL_HEADER] = internal_token
    return carrier


class MeshClientInterceptor:
    """Gives calls without a timeout the default deadline and sends the current trace
    context, and the mesh's internal token when there is one, as metadata.

    grpc.aio files an interceptor under the first call kind it implements only (an
    ``isinstance`` chain with ``elif``), so one object implementing all four would see unary
    calls alone: :func:`client_interceptors` makes one instance per kind."""

    def __init__(self, default_deadline_s: float, internal_token: str | None = None) -> None:
        self._default_deadline_s = default_deadline_s
        self._internal_token = internal_token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        carrier = mesh_headers(self._internal_token)
        timeout = details.timeout
        if timeout is not None and not carrier:
            return details
        metadata = details.metadata
        if carrier:
            metadata = grpc.aio.Metadata(*(metadata or ()))
            for key, value in carrier.items():
                # a caller that set the header itself meant it
                if key not in metadata:
                    metadata.add(key, value)
        return grpc.aio.ClientCallDetails(
            details.method,
            self._default_deadline_s if timeout is None else timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
        )


class _UnaryUnaryInterceptor(MeshClientInterceptor, _UnaryUnary):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _UnaryStreamInterceptor(MeshClientInterceptor, _UnaryStream):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _StreamUnaryInterceptor(MeshClientInterceptor, _StreamUnary):
    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStreamInterceptor(MeshClientInterceptor, _StreamStream):
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def client_interceptors(settings: MeshSettings) -> list[MeshClientInterceptor]:
    """The mesh's client interceptor for each of the four call kinds."""
    kinds = (
        _UnaryUnaryInterceptor,
        _UnaryStreamInterceptor,
        _StreamUnaryInterceptor,
        _StreamStreamInterceptor,
    )
    return [kind(settings.default_deadline_s, settings.internal_token) for kind in kinds]


def open_channel(
    target: str, settings: MeshSettings, *, retry_services: Sequence[str] = ()
) -> grpc.aio.Channel:
    """A channel to ``target`` (``host:port``) with the mesh's limits, keepalive, UNAVAILABLE
    retries for ``retry_services`` (full names, ``scoremesh.registry.v1.ModelRegistry``), default
    deadline, trace propagation and, with ``settings.tls``, mutual TLS. Use it as ``async with``
    or ``await channel.close()``."""
    return open_grpc_channel(
        target,
        settings.tls,
        options=channel_options(settings, retry_services=retry_services),
        interceptors=client_interceptors(settings),
    )


def open_lean_channel(target: str, settings: MeshSettings) -> grpc.aio.Channel:
    """A channel like :func:`open_channel` but without interceptors, for a hot path that sets
    a timeout on every call and sends :func:`mesh_headers` itself: grpc.aio's interceptor
    machinery costs about 50 µs of CPU per call."""
    return open_grpc_channel(target, settings.tls, options=channel_options(settings))
