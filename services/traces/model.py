"""Spans and traces as the store keeps them, and the attribute names the CLI reads.

Span authors: ``scoremesh traces --model NAME`` matches a trace when any of its spans carries
``scoremesh.model = NAME`` (:data:`MODEL_ATTRIBUTE`); the waterfall shows the attributes in
:data:`KEY_ATTRIBUTES` beside each span. ``--service`` reads the resource's ``service.name``
(``OTEL_SERVICE_NAME``), and a trace's status is ``error`` when any span's status is ERROR.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple, TypeAlias

__all__ = [
    "KEY_ATTRIBUTES",
    "MODEL_ATTRIBUTE",
    "SERVICE_PREFIX",
    "AttributeValue",
    "SpanKind",
    "SpanRecord",
    "SpanStatus",
    "StoredSpan",
    "TraceQuery",
    "TraceSummary",
]

AttributeValue: TypeAlias = (
    str | bool | int | float | Sequence["AttributeValue"] | Mapping[str, "AttributeValue"] | None
)
"""An OTLP ``AnyValue`` as JSON: arrays become lists, key-value lists objects, bytes base64."""

MODEL_ATTRIBUTE: Final = "scoremesh.model"
"""The span attribute ``--model`` matches: the model's name as the caller asked for it."""

KEY_ATTRIBUTES: Final = (
    "rpc.method",
    "scoremesh.model",
    "scoremesh.version",
    "scoremesh.backend",
    "scoremesh.batch_size",
    "triton.model_name",
    "triton.model_version",
    "db.statement",
    "db.query.text",
    "http.route",
    "http.status_code",
    "http.response.status_code",
)
"""The attributes the waterfall prints after each span, in this order, when present (the
``db.*`` statements shortened). Triton's own spans carry ``triton.model_*``; the newer HTTP and
database conventions' names stand beside the older ones."""

SERVICE_PREFIX: Final = "scoremesh-"
"""``--service scoring`` also matches ``scoremesh-scoring``, the name ``scoremesh up`` gives."""


class SpanKind(enum.IntEnum):
    """OTLP's ``Span.SpanKind`` numbers."""

    UNSPECIFIED = 0
    INTERNAL = 1
    SERVER = 2
    CLIENT = 3
    PRODUCER = 4
    CONSUMER = 5


class SpanStatus(enum.IntEnum):
    """OTLP's ``Status.StatusCode`` numbers."""

    UNSET = 0
    OK = 1
    ERROR = 2


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """One span as stored: ids in lowercase hex, times in ns since the Unix epoch."""

    trace_id: str
    span_id: str
    parent_span_id: str
    """"" for a root span."""
    name: str
    kind: int
    """A :class:`SpanKind` number (an unknown number is kept as sent)."""
    service: str
    """The resource's ``service.name``."""
    scope: str
    """The instrumentation scope's name (the tracer's)."""
    start_ns: int
    end_ns: int
    status_code: int
    """A :class:`SpanStatus` number."""
    status_message: str
    attributes: Mapping[str, AttributeValue]
    events: Sequence[Mapping[str, AttributeValue]] = ()
    """``{"name", "time_unix_nano", "attributes"}`` each."""
    links: Sequence[Mapping[str, AttributeValue]] = ()
    """``{"trace_id", "span_id", "attributes"}`` each."""

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)

    @property
    def failed(self) -> bool:
        return self.status_code == SpanStatus.ERROR


class StoredSpan(NamedTuple):
    """A span as the receiver writes it: the columns the listing filters and joins on, and
    the span itself as OTLP protobuf, read back into a :class:`SpanRecord` only when a trace
    is shown. Its fields are the store's columns, in their order."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    service: str
    scope: str
    start_ns: int
    end_ns: int
    status_code: int
    model: str | None
    """The :data:`MODEL_ATTRIBUTE`, when the span has one and it is a non-empty string."""
    otlp: bytes
    """The ``opentelemetry.proto.trace.v1.Span``, serialized."""


@dataclass(frozen=True, slots=True)
class TraceSummary:
    """One trace as ``scoremesh traces`` lists it."""

    trace_id: str
    root_name: str
    """The root span's name: the span without a parent, else the earliest one whose parent
    is not in the store (a trace continued from a caller that does not export)."""
    root_service: str
    services: Sequence[str]
    """Every service with a span in the trace, sorted."""
    span_count: int
    error_count: int
    start_ns: int
    end_ns: int

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)

    @property
    def failed(self) -> bool:
        return self.error_count > 0


@dataclass(frozen=True, slots=True)
class TraceQuery:
    """What ``scoremesh traces`` lists: traces that started at or after ``since_ns`` and match
    every filter given, slowest first (``order="duration"``) or newest first (``"start"``)."""

    service: str | None = None
    model: str | None = None
    failed: bool | None = None
    """True: only traces with an error; False: only those without."""
    since_ns: int | None = None
    limit: int = 20
    order: str = "duration"
