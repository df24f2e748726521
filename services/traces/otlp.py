"""OTLP trace exports → stored spans → span records: the one conversion between the wire and
the store.

Both transports carry an ``ExportTraceServiceRequest``: as binary protobuf (OTLP/gRPC, and
OTLP/HTTP with ``application/x-protobuf``) or in OTLP's JSON encoding (OTLP/HTTP with
``application/json``). That JSON is proto3 JSON but for the ids: trace and span ids are hex
strings rather than base64 (opentelemetry-cpp, hence Triton, writes them so). Base64 ids are
accepted too; the two cannot be confused, since their lengths differ.

A body that cannot be read fails whole (:class:`InvalidArgument`); a readable export whose
spans have invalid ids keeps the others and reports the rejected count, as OTLP's partial
success says.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from services.mesh.errors import InvalidArgument
from services.traces.model import MODEL_ATTRIBUTE, AttributeValue, SpanRecord, StoredSpan

__all__ = [
    "DecodedExport",
    "decode_export",
    "request_from_json",
    "request_from_protobuf",
    "response_for",
    "response_to_json",
    "span_record",
]

UNKNOWN_SERVICE: Final = "unknown_service"
"""The service of spans whose resource names none (the SDK's own default starts so too)."""

_TRACE_ID_BYTES: Final = 16
_SPAN_ID_BYTES: Final = 8
# SQLite integers are signed 64-bit: later times are not times anyway
_MAX_TIME_NS: Final = 2**63 - 1
# OTLP JSON field names, in their lowerCamelCase and proto spellings
_ID_FIELDS: Final = ("traceId", "trace_id", "spanId", "span_id", "parentSpanId", "parent_span_id")
_RESOURCE_SPANS: Final = ("resourceSpans", "resource_spans")
_SCOPE_SPANS: Final = ("scopeSpans", "scope_spans")


@dataclass(frozen=True, slots=True)
class DecodedExport:
    """An export's valid spans, and how many were rejected (and why, for the first)."""

    spans: list[StoredSpan] = field(default_factory=list)
    rejected: int = 0
    error_message: str = ""


def request_from_protobuf(body: bytes) -> ExportTraceServiceRequest:
    """Parses a binary ``ExportTraceServiceRequest``; InvalidArgument when it is not one."""
    try:
        return ExportTraceServiceRequest.FromString(body)
    except DecodeError as error:
        raise InvalidArgument(
            f"the body is not an OTLP ExportTraceServiceRequest in protobuf: {error}",
            reason="OTLP_PROTOBUF_INVALID",
        ) from None


def request_from_json(body: bytes) -> ExportTraceServiceRequest:
    """Parses an ``ExportTraceServiceRequest`` in OTLP JSON (ids in hex or base64; unknown
    fields ignored, as OTLP asks of receivers); InvalidArgument when it is not one."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise InvalidArgument(f"the body is not JSON: {error}", reason="OTLP_JSON_INVALID") from None
    if not isinstance(document, dict):
        raise InvalidArgument(
            "the body must be a JSON object (an ExportTraceServiceRequest)", reason="OTLP_JSON_INVALID"
        )
    _ids_to_base64(document)
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(document, request, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as error:
        raise InvalidArgument(
            f"the body is not an OTLP ExportTraceServiceRequest: {error}", reason="OTLP_JSON_INVALID"
        ) from None
    return request


def _ids_to_base64(document: dict[str, Any]) -> None:
    """Rewrites every span's and link's hex ids as base64, which proto3 JSON reads as bytes."""
    for resource_spans in _members(document, _RESOURCE_SPANS):
        for scope_spans in _members(resource_spans, _SCOPE_SPANS):
            for span in _members(scope_spans, ("spans",)):
                _rewrite_ids(span, "span")
                for link in _members(span, ("links",)):
                    _rewrite_ids(link, "link")


def _members(parent: object, names: tuple[str, ...]) -> Iterable[dict[str, Any]]:
    # anything not shaped as expected is left for ParseDict to report with its path
    if not isinstance(parent, dict):
        return
    for name in names:
        children = parent.get(name)
        if isinstance(children, list):
            yield from (child for child in children if isinstance(child, dict))


def _rewrite_ids(holder: dict[str, Any], what: str) -> None:
    for name in _ID_FIELDS:
        value = holder.get(name)
        if not isinstance(value, str) or not value:
            continue
        if len(value) % 2 == 0:
            try:
                holder[name] = base64.b64encode(bytes.fromhex(value)).decode()
                continue
            except ValueError:
                pass  # not hex: base64, or neither
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument.for_field(
                f"{what}.{name}", f"{value[:64]!r} is neither hex nor base64", reason="OTLP_JSON_INVALID"
            ) from None


def decode_export(request: ExportTraceServiceRequest) -> DecodedExport:
    """Every span of ``request`` as the store writes it; spans with invalid ids are counted as
    rejected. Only the columns the store indexes are read here (the rest of a span is read
    when its trace is shown, :func:`span_record`): this runs for every span received."""
    spans: list[StoredSpan] = []
    rejected = 0
    error_message = ""
    for resource_spans in request.resource_spans:
        service = _service_name(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope.name
            for span in scope_spans.spans:
                problem = _problem(span)
                if problem:
                    rejected += 1
                    error_message = error_message or problem
                    continue
                parent = span.parent_span_id
                spans.append(
                    StoredSpan(
                        span.trace_id.hex(),
                        span.span_id.hex(),
                        parent.hex() if any(parent) else "",
                        span.name,
                        span.kind,
                        service,
                        scope,
                        span.start_time_unix_nano,
                        span.end_time_unix_nano,
                        span.status.code,
                        _model(span.attributes),
                        span.SerializeToString(),
                    )
                )
    if rejected:
        error_message = f"{rejected} span(s) rejected; the first: {error_message}"
    return DecodedExport(spans, rejected, error_message)


def span_record(stored: StoredSpan) -> SpanRecord:
    """A stored span in full, its attributes, events and links read from its OTLP bytes."""
    span = Span.FromString(stored.otlp)
    return SpanRecord(
        trace_id=stored.trace_id,
        span_id=stored.span_id,
        parent_span_id=stored.parent_span_id,
        name=stored.name,
        kind=stored.kind,
        service=stored.service,
        scope=stored.scope,
        start_ns=stored.start_ns,
        end_ns=stored.end_ns,
        status_code=stored.status_code,
        status_message=span.status.message,
        attributes=_attributes(span.attributes),
        events=[
            {
                "name": event.name,
                "time_unix_nano": event.time_unix_nano,
                "attributes": _attributes(event.attributes),
            }
            for event in span.events
        ],
        links=[
            {
                "trace_id": link.trace_id.hex(),
                "span_id": link.span_id.hex(),
                "attributes": _attributes(link.attributes),
            }
            for link in span.links
        ],
    )


def response_for(decoded: DecodedExport) -> ExportTraceServiceResponse:
    """The export's answer: empty when every span was taken, else a partial success."""
    if not decoded.rejected:
        return ExportTraceServiceResponse()
    return ExportTraceServiceResponse(
        partial_success=ExportTracePartialSuccess(
            rejected_spans=decoded.rejected, error_message=decoded.error_message
        )
    )


def response_to_json(response: ExportTraceServiceResponse) -> bytes:
    return json_format.MessageToJson(response, indent=None).encode()


def _service_name(attributes: Iterable[KeyValue]) -> str:
    for attribute in attributes:
        if attribute.key == "service.name" and attribute.value.WhichOneof("value") == "string_value":
            return attribute.value.string_value or UNKNOWN_SERVICE
    return UNKNOWN_SERVICE


def _problem(span: Span) -> str:
    name = span.name[:64]
    if len(span.trace_id) != _TRACE_ID_BYTES or not any(span.trace_id):
        return f"span {name!r}: trace_id must be 16 bytes, not all zero"
    if len(span.span_id) != _SPAN_ID_BYTES or not any(span.span_id):
        return f"span {name!r}: span_id must be 8 bytes, not all zero"
    if len(span.parent_span_id) not in (0, _SPAN_ID_BYTES):
        return f"span {name!r}: parent_span_id must be empty or 8 bytes"
    if span.start_time_unix_nano > _MAX_TIME_NS or span.end_time_unix_nano > _MAX_TIME_NS:
        return f"span {name!r}: its times are past the year 2262"
    return ""


def _model(attributes: Iterable[KeyValue]) -> str | None:
    for attribute in attributes:
        if attribute.key == MODEL_ATTRIBUTE:
            value = attribute.value
            if value.WhichOneof("value") == "string_value" and value.string_value:
                return value.string_value
            return None
    return None


def _attributes(attributes: Iterable[KeyValue]) -> Mapping[str, AttributeValue]:
    return {attribute.key: _value(attribute.value) for attribute in attributes}


def _value(value: AnyValue) -> AttributeValue:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        number = value.double_value
        # JSON has no NaN or infinity: keep them as the text Python prints
        return number if math.isfinite(number) else repr(number)
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    return None
