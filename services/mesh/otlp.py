"""OTLP trace export for the lean tracer (``spans.py``): the protobuf encoding, written
directly, and the two standard transports.

The encoding writes ``ExportTraceServiceRequest`` bytes field by field (the wire format of
opentelemetry-proto's ``trace.proto``) instead of building protobuf message objects, and
keeps the encoding of attribute pairs it has seen, since a service's spans repeat the same
few (``rpc.method``, ``scoremesh.model`` …): about a tenth of the SDK encoder's cost per span.

Transports, configured by the standard variables (the ``_TRACES_`` form wins over the plain
one): ``OTEL_EXPORTER_OTLP_PROTOCOL`` ``http/protobuf`` (a POST to ``…/v1/traces``) or
``grpc`` (``TraceService/Export``); ``…_ENDPOINT``, ``…_HEADERS``, ``…_TIMEOUT`` (in
milliseconds, as the specification says; default 10 s), ``…_COMPRESSION`` (``gzip`` or
``none``), ``…_CERTIFICATE``, ``…_CLIENT_KEY``, ``…_CLIENT_CERTIFICATE`` and, for gRPC
endpoints without a scheme, ``…_INSECURE``. A failed export is retried with backoff while
the collector answers that it is busy or unreachable, within the timeout, then dropped.
"""

from __future__ import annotations

import gzip
import http.client
import logging
import random
import ssl
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc
from opentelemetry.trace import SpanContext, SpanKind
from opentelemetry.trace.status import StatusCode

from services.mesh.settings import SettingsError
from services.mesh.spans import Scope, SpanAttributes, SpanEvent, SpanLink, SpanRecord

__all__ = [
    "EXPORT_METHOD",
    "ExportSettings",
    "GrpcTransport",
    "HttpTransport",
    "OtlpEncoder",
    "OtlpExporter",
    "encode_export_request",
    "exporter_from_env",
]

log = logging.getLogger(__name__)

EXPORT_METHOD: Final = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_DEFAULT_TIMEOUT_S: Final = 10.0
_RETRY_HTTP: Final = frozenset({429, 502, 503, 504})
_RETRY_GRPC: Final = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

# span.proto: SpanKind is the API's value + 1; SpanFlags' "has is_remote" and "is_remote" bits
_KINDS: Final = {kind: bytes([0x30, kind.value + 1]) for kind in SpanKind}
_HAS_IS_REMOTE: Final = 0x100
_IS_REMOTE: Final = 0x200
_SMALL: Final = [bytes([n]) for n in range(0x80)]
_fixed64 = struct.Struct("<Q").pack
_fixed32 = struct.Struct("<I").pack
_double = struct.Struct("<d").pack
_MAX_CACHED_PAIRS: Final = 4096


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value] if value >= 0 else _varint(value + (1 << 64))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag byte(s), the length, the bytes."""
    return tag + _varint(len(payload)) + payload


def _any_value(value: Any) -> bytes:
    # AnyValue: string 1, bool 2, int 3, double 4, array 5 (ArrayValue.values 1)
    kind = type(value)
    if kind is str:
        return _field(b"\x0a", value.encode("utf-8", "surrogatepass"))
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int:
        return b"\x18" + _varint(value)
    if kind is float:
        return b"\x21" + _double(value)
    if kind is tuple:
        values = b"".join(_field(b"\x0a", b"" if item is None else _any_value(item)) for item in value)
        return _field(b"\x2a", values)
    raise TypeError(f"cannot encode an attribute of type {kind.__name__}")


class OtlpEncoder:
    """Encodes spans; keeps the encoding of each attribute pair and scope it has seen."""

    def __init__(self, resource: Mapping[str, str]) -> None:
        self._pairs: dict[tuple[str, type, Any], bytes] = {}
        self._scopes: dict[Scope, bytes] = {}
        # ResourceSpans.resource (1) holding Resource.attributes (1)
        self._resource = _field(b"\x0a", b"".join(self._pair(b"\x0a", k, v) for k, v in resource.items()))

    def _pair(self, tag: bytes, key: str, value: Any) -> bytes:
        """One KeyValue (key 1, value 2) as the field ``tag`` of its message."""
        # span attributes are the ones that repeat; True == 1 == 1.0, so the type is in the key
        cacheable = tag == b"\x4a" and type(value) is not tuple
        if cacheable:
            cached = self._pairs.get((key, type(value), value))
            if cached is not None:
                return cached
        encoded = _field(
            tag, _field(b"\x0a", key.encode("utf-8", "surrogatepass")) + _field(b"\x12", _any_value(value))
        )
        if cacheable:
            if len(self._pairs) >= _MAX_CACHED_PAIRS:
                self._pairs.clear()
            self._pairs[(key, type(value), value)] = encoded
        return encoded

    def _attributes(self, tag: bytes, attributes: SpanAttributes, dropped_tag: bytes) -> list[bytes]:
        parts = [self._pair(tag, key, value) for key, value in attributes.items.items()]
        if attributes.dropped:
            parts.append(dropped_tag + _varint(attributes.dropped))
        return parts

    def _scope(self, scope: Scope) -> bytes:
        encoded = self._scopes.get(scope)
        if encoded is None:
            # ScopeSpans.scope (1): InstrumentationScope name 1, version 2
            body = _field(b"\x0a", scope.name.encode())
            if scope.version:
                body += _field(b"\x12", scope.version.encode())
            encoded = self._scopes[scope] = _field(b"\x0a", body)
        return encoded

    def _event(self, event: SpanEvent) -> bytes:
        # Span.Event: time 1 (fixed64), name 2, attributes 3, dropped 4
        parts = [
            b"\x09",
            _fixed64(event.time_ns),
            _field(b"\x12", event.name.encode("utf-8", "surrogatepass")),
        ]
        parts += self._attributes(b"\x1a", event.attributes, b"\x20")
        return _field(b"\x5a", b"".join(parts))

    def _link(self, link: SpanLink) -> bytes:
        # Span.Link: trace_id 1, span_id 2, trace_state 3, attributes 4, dropped 5, flags 6
        context = link.context
        parts = _ids(context)
        parts += self._attributes(b"\x22", link.attributes, b"\x28")
        parts += [b"\x35", _fixed32(_flags(context))]
        return _field(b"\x6a", b"".join(parts))

    def span(self, span: SpanRecord) -> bytes:
        context = span.get_span_context()
        parts = _ids(context)
        parent = span.parent
        if parent is not None:
            parts += [b"\x22\x08", parent.span_id.to_bytes(8, "big")]
        parts += [
            _field(b"\x2a", span.name.encode("utf-8", "surrogatepass")),
            _KINDS[span.kind],
            b"\x39",
            _fixed64(span.start_ns),
            b"\x41",
            _fixed64(span.end_ns),
        ]
        parts += self._attributes(b"\x4a", span.attributes, b"\x50")
        if span.events:
            parts += [self._event(event) for event in span.events]
        if span.dropped_events:
            parts += [b"\x60", _varint(span.dropped_events)]
        if span.links:
            parts += [self._link(link) for link in span.links]
        if span.dropped_links:
            parts += [b"\x70", _varint(span.dropped_links)]
        if span.status_code is not StatusCode.UNSET:
            # Status: message 2, code 3
            status = (
                _field(b"\x12", span.status_message.encode("utf-8", "surrogatepass"))
                if span.status_message
                else b""
            )
            parts.append(_field(b"\x7a", status + b"\x18" + _SMALL[span.status_code.value]))
        remote = _IS_REMOTE if parent is not None and parent.is_remote else 0
        parts += [b"\x85\x01", _fixed32(context.trace_flags | _HAS_IS_REMOTE | remote)]
        return _field(b"\x12", b"".join(parts))

    def request(self, spans: Iterable[SpanRecord]) -> bytes:
        by_scope: dict[Scope, list[bytes]] = {}
        for span in spans:
            encoded = self.span(span)
            group = by_scope.get(span.scope)
            if group is None:
                by_scope[span.scope] = [encoded]
            else:
                group.append(encoded)
        # ScopeSpans: scope 1, spans 2; ResourceSpans: resource 1, scope_spans 2
        scope_spans = b"".join(
            _field(b"\x12", self._scope(scope) + b"".join(encoded)) for scope, encoded in by_scope.items()
        )
        return _field(b"\x0a", self._resource + scope_spans)


def _ids(context: SpanContext) -> list[bytes]:
    """trace_id (1), span_id (2) and trace_state (3), which Span and Span.Link share."""
    parts = [
        b"\x0a\x10",
        context.trace_id.to_bytes(16, "big"),
        b"\x12\x08",
        context.span_id.to_bytes(8, "big"),
    ]
    if context.trace_state:
        parts.append(_field(b"\x1a", context.trace_state.to_header().encode()))
    return parts


def _flags(context: SpanContext) -> int:
    return context.trace_flags | _HAS_IS_REMOTE | (_IS_REMOTE if context.is_remote else 0)


def encode_export_request(resource: Mapping[str, str], spans: Sequence[SpanRecord]) -> bytes:
    """``spans`` as one ``ExportTraceServiceRequest`` from ``resource`` (for tests and tools;
    an exporter keeps one encoder, and with it the pairs it has seen)."""
    return OtlpEncoder(resource).request(spans)


@dataclass(frozen=True, slots=True)
class ExportSettings:
    """Where and how spans are sent, read from the standard ``OTEL_EXPORTER_OTLP_*`` variables."""

    protocol: str
    endpoint: str
    headers: tuple[tuple[str, str], ...]
    timeout_s: float
    gzip: bool
    certificate: str | None
    client_key: str | None
    client_certificate: str | None
    insecure: bool

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ExportSettings:
        def read(name: str) -> str:
            return (
                env.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or env.get(f"OTEL_EXPORTER_OTLP_{name}") or ""
            ).strip()

        protocol = read("PROTOCOL") or "http/protobuf"
        if protocol not in ("http/protobuf", "grpc"):
            raise SettingsError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: expected grpc or http/protobuf")
        own_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        if protocol == "grpc":
            endpoint = read("ENDPOINT") or "http://localhost:4317"
        elif own_endpoint:
            endpoint = own_endpoint  # the signal's own endpoint is used as it is
        else:
            base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or "http://localhost:4318"
            endpoint = base.removesuffix("/") + "/v1/traces"
        timeout_raw = read("TIMEOUT")
        timeout_s = _DEFAULT_TIMEOUT_S
        if timeout_raw:
            try:
                timeout_s = float(timeout_raw) / 1000
            except ValueError:
                raise SettingsError(
                    f"OTEL_EXPORTER_OTLP_TIMEOUT={timeout_raw!r} is not a number of ms"
                ) from None
            if not timeout_s > 0:
                raise SettingsError(f"OTEL_EXPORTER_OTLP_TIMEOUT={timeout_raw!r} must be positive")
        compression = read("COMPRESSION").lower() or "none"
        if compression not in ("gzip", "none"):
            raise SettingsError(f"OTEL_EXPORTER_OTLP_COMPRESSION={compression!r}: expected gzip or none")
        return cls(
            protocol=protocol,
            endpoint=endpoint,
            headers=_headers(read("HEADERS")),
            timeout_s=timeout_s,
            gzip=compression == "gzip",
            certificate=read("CERTIFICATE") or None,
            client_key=read("CLIENT_KEY") or None,
            client_certificate=read("CLIENT_CERTIFICATE") or None,
            insecure=read("INSECURE").lower() == "true",
        )


def _headers(text: str) -> tuple[tuple[str, str], ...]:
    headers = []
    for pair in text.split(","):
        if not pair.strip():
            continue
        key, equals, value = pair.partition("=")
        if not equals or not key.strip():
            raise SettingsError(f"OTEL_EXPORTER_OTLP_HEADERS: {pair.strip()!r} is not key=value")
        headers.append((urllib.parse.unquote(key.strip()).lower(), urllib.parse.unquote(value.strip())))
    return tuple(headers)


class _Retryable(Exception):
    """The collector could not take the export now; trying again later may work."""


class HttpTransport:
    """POSTs ``application/x-protobuf`` bodies over one kept-alive connection."""

    def __init__(self, settings: ExportSettings) -> None:
        url = urllib.parse.urlsplit(settings.endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise SettingsError(
                f"OTEL_EXPORTER_OTLP_ENDPOINT: {settings.endpoint!r} is no http(s) URL for OTLP/HTTP"
            )
        self._settings = settings
        self._https = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port or (443 if self._https else 80)
        self._path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self._context: ssl.SSLContext | None = None
        if self._https:
            self._context = ssl.create_default_context(cafile=settings.certificate)
            if settings.client_certificate:
                self._context.load_cert_chain(settings.client_certificate, settings.client_key)
        self._headers = {"Content-Type": "application/x-protobuf", **dict(settings.headers)}
        if settings.gzip:
            self._headers["Content-Encoding"] = "gzip"
        self._connection: http.client.HTTPConnection | None = None

    def _connect(self, timeout_s: float) -> http.client.HTTPConnection:
        if self._connection is None:
            if self._https:
                self._connection = http.client.HTTPSConnection(
                    self._host, self._port, timeout=timeout_s, context=self._context
                )
            else:
                self._connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout_s)
        else:
            self._connection.timeout = timeout_s
            if self._connection.sock is not None:
                self._connection.sock.settimeout(timeout_s)
        return self._connection

    def send(self, body: bytes, timeout_s: float) -> None:
        if self._settings.gzip:
            body = gzip.compress(body, compresslevel=1)
        connection = self._connect(timeout_s)
        try:
            connection.request("POST", self._path, body, self._headers)
            response = connection.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
        if response.status in _RETRY_HTTP:
            raise _Retryable(f"HTTP {response.status}")
        if not 200 <= response.status < 300:
            raise RuntimeError(f"HTTP {response.status}: {answer[:200]!r}")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _grpc_target(settings: ExportSettings) -> tuple[str, bool]:
    """The channel target and whether it is plaintext: ``http://`` is, ``https://`` is not,
    and a bare ``host:port`` is only when ``…_INSECURE`` is true (as the SDK reads them)."""
    endpoint = settings.endpoint
    if "://" in endpoint:
        url = urllib.parse.urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise SettingsError(
                f"OTEL_EXPORTER_OTLP_ENDPOINT: {endpoint!r} for OTLP/gRPC: expected "
                "http(s)://host:port or host:port"
            )
        return url.netloc, url.scheme == "http"
    return endpoint, settings.insecure


class GrpcTransport:
    """Calls ``TraceService/Export`` with the encoded request as it is."""

    def __init__(self, settings: ExportSettings) -> None:
        target, plaintext = _grpc_target(settings)
        if plaintext:
            self._channel = grpc.insecure_channel(target)
        else:
            credentials = grpc.ssl_channel_credentials(
                _read(settings.certificate), _read(settings.client_key), _read(settings.client_certificate)
            )
            self._channel = grpc.secure_channel(target, credentials)
        # bytes in, bytes out: no serializers
        self._export: Callable[..., Any] = self._channel.unary_unary(EXPORT_METHOD, None, None)
        self._metadata = settings.headers
        self._compression = grpc.Compression.Gzip if settings.gzip else None

    def send(self, body: bytes, timeout_s: float) -> None:
        try:
            self._export(body, timeout=timeout_s, metadata=self._metadata, compression=self._compression)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            if code in _RETRY_GRPC:
                raise _Retryable(code.name) from exc
            raise RuntimeError(
                f"{code.name}: {exc.details() if isinstance(exc, grpc.Call) else exc}"
            ) from exc

    def close(self) -> None:
        self._channel.close()


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as file:
        return file.read()


class OtlpExporter:
    """Encodes a batch of ended spans and sends it, retrying with backoff (1 s, 2 s, 4 s …,
    jittered) within the timeout while the collector is busy or away."""

    def __init__(self, settings: ExportSettings, resource: Mapping[str, str]) -> None:
        self.settings = settings
        self._encoder = OtlpEncoder(resource)
        self._transport: HttpTransport | GrpcTransport = (
            GrpcTransport(settings) if settings.protocol == "grpc" else HttpTransport(settings)
        )
        self._stop = threading.Event()
        self.retries = 0
        """Exports tried again because the collector was busy or unreachable."""

    def export(self, spans: Sequence[SpanRecord]) -> bool:
        if not spans:
            return True
        body = self._encoder.request(spans)
        deadline = time.monotonic() + self.settings.timeout_s
        backoff = 1.0
        while True:
            try:
                self._transport.send(body, max(0.001, deadline - time.monotonic()))
                return True
            except _Retryable as exc:
                pause = backoff * random.uniform(0.8, 1.2)
                if self._stop.is_set() or time.monotonic() + pause >= deadline:
                    log.warning("dropped %d spans: the collector did not take them (%s)", len(spans), exc)
                    return False
                self.retries += 1
                self._stop.wait(pause)
                backoff *= 2
            except Exception as exc:
                log.warning("dropped %d spans: the collector refused them (%s)", len(spans), exc)
                return False

    def shutdown(self) -> None:
        self._stop.set()
        self._transport.close()


def exporter_from_env(env: Mapping[str, str], resource: Mapping[str, str]) -> OtlpExporter:
    return OtlpExporter(ExportSettings.from_env(env), resource)
