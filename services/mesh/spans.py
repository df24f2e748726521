"""A lean OpenTelemetry tracer provider: the mesh's own implementation of the tracing API.

Library code only ever calls the OpenTelemetry API; ``setup_tracing`` installs this provider
behind it. It exists because the official SDK costs the scoring service's one event loop too
much per span (bench/README.md, "Tracing": about 20 µs to start and end a span, as much again
to encode it, with the export thread holding the GIL meanwhile). Here a span is a slotted
object that keeps its attributes in a plain dict and, once ended, is queued as it is; the
export thread encodes it straight to OTLP bytes (``otlp.py``).

What it implements of the specification, read from the standard variables:

* samplers ``always_on``, ``always_off``, ``traceidratio`` and their ``parentbased_*``
  forms (``OTEL_TRACES_SAMPLER``, ``OTEL_TRACES_SAMPLER_ARG``), with the SDK's decisions:
  a ratio sampler keeps a trace when the low 64 bits of its id fall under ``ratio·2⁶⁴``;
* span limits (``OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT``, ``OTEL_SPAN_EVENT_COUNT_LIMIT``,
  ``OTEL_SPAN_LINK_COUNT_LIMIT``, ``OTEL_[SPAN_]ATTRIBUTE_VALUE_LENGTH_LIMIT``), with
  dropped counts;
* a batching export queue (``OTEL_BSP_SCHEDULE_DELAY``, ``OTEL_BSP_MAX_QUEUE_SIZE``,
  ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``, ``OTEL_BSP_EXPORT_TIMEOUT``) drained by one thread;
* the resource from ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``.

An unsampled span is the API's ``NonRecordingSpan`` with a fresh span id, so that the
decision travels to the next hop in ``traceparent``, as the SDK does.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import threading
import time
import traceback
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode
from opentelemetry.util import types

from services.mesh.settings import SettingsError, env_float, env_int, env_str

__all__ = [
    "SAMPLERS",
    "ExportQueue",
    "LeanSpan",
    "LeanTracer",
    "LeanTracerProvider",
    "QueueSettings",
    "Sampler",
    "Scope",
    "SpanAttributes",
    "SpanEvent",
    "SpanExporter",
    "SpanLimits",
    "SpanLink",
    "SpanRecord",
    "resource_from_env",
]

log = logging.getLogger(__name__)

SAMPLERS: Final = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)

_ID_LIMIT: Final = 1 << 64
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED: Final = TraceFlags(TraceFlags.DEFAULT)
_EMPTY_STATE: Final = TraceState()
_SCALARS: Final = (str, bool, int, float)
_SCALAR_SET: Final = frozenset(_SCALARS)
_ids = random.Random()


class SpanExporter(Protocol):
    """Where ended spans go, a batch at a time, from the export thread."""

    def export(self, spans: Sequence[SpanRecord]) -> bool:
        """Sends ``spans``; False when they could not be delivered (they are dropped)."""

    def shutdown(self) -> None:
        """Releases connections; no export follows."""


@dataclass(frozen=True, slots=True)
class Sampler:
    """Whether a new span is recorded and exported: ``parent_based`` follows a valid parent's
    sampled flag; a root (or every span, when not parent-based) is kept when its trace id's
    low 64 bits fall under ``bound`` (``ratio·2⁶⁴``: 0 keeps none, 2⁶⁴ keeps all)."""

    parent_based: bool
    bound: int

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Sampler:
        name = env_str(env, "OTEL_TRACES_SAMPLER", "parentbased_always_on", choices=SAMPLERS)
        root = name.removeprefix("parentbased_")
        if root == "always_on":
            ratio = 1.0
        elif root == "always_off":
            ratio = 0.0
        else:
            ratio = env_float(env, "OTEL_TRACES_SAMPLER_ARG", 1.0, minimum=0.0, maximum=1.0)
        return cls(parent_based=name.startswith("parentbased_"), bound=round(ratio * _ID_LIMIT))

    def sampled(self, parent: SpanContext | None, trace_id: int) -> bool:
        if self.parent_based and parent is not None:
            return parent.trace_flags.sampled
        return (trace_id & (_ID_LIMIT - 1)) < self.bound


@dataclass(frozen=True, slots=True)
class SpanLimits:
    """How much one span keeps; what is over a limit is dropped and counted."""

    attributes: int = 128
    events: int = 128
    links: int = 128
    value_length: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SpanLimits:
        length_var = (
            "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT"
            if env.get("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "").strip()
            else "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT"
        )
        length = env_int(env, length_var, -1, minimum=0)
        return cls(
            attributes=env_int(env, "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", 128, minimum=0),
            events=env_int(env, "OTEL_SPAN_EVENT_COUNT_LIMIT", 128, minimum=0),
            links=env_int(env, "OTEL_SPAN_LINK_COUNT_LIMIT", 128, minimum=0),
            value_length=None if length < 0 else length,
        )


@dataclass(frozen=True, slots=True)
class Scope:
    """The instrumentation scope of a tracer: the name (and version) it was asked for with."""

    name: str
    version: str = ""
    schema_url: str = ""


def resource_from_env(env: Mapping[str, str], default_service_name: str, sdk_version: str) -> dict[str, str]:
    """The process's resource attributes: ``OTEL_RESOURCE_ATTRIBUTES`` (``k=v`` pairs,
    percent-encoded), ``OTEL_SERVICE_NAME`` over its ``service.name``, ``default_service_name``
    when neither names the service, and the ``telemetry.sdk.*`` attributes of this SDK."""
    attributes: dict[str, str] = {}
    for pair in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        if not pair.strip():
            continue
        key, equals, value = pair.partition("=")
        if not equals or not key.strip():
            raise SettingsError(f"OTEL_RESOURCE_ATTRIBUTES: {pair.strip()!r} is not key=value")
        attributes[urllib.parse.unquote(key.strip())] = urllib.parse.unquote(value.strip())
    service = env.get("OTEL_SERVICE_NAME", "").strip()
    if service:
        attributes["service.name"] = service
    attributes.setdefault("service.name", default_service_name)
    attributes["telemetry.sdk.language"] = "python"
    attributes["telemetry.sdk.name"] = "scoremesh"
    attributes["telemetry.sdk.version"] = sdk_version
    return attributes


def _clean(value: object, limit: int | None) -> Any:
    """An attribute value the OTLP encoder can write, or None for one the API does not
    allow (it is dropped, as the SDK drops it). Sequences become tuples of one type."""
    kind = type(value)
    if kind is str:
        return value if limit is None else value[:limit]  # type: ignore[index]
    if kind in _SCALARS:
        return value
    if isinstance(value, bytes):
        try:
            return _clean(value.decode(), limit)
        except UnicodeDecodeError:
            return None
    if isinstance(value, Sequence) and not isinstance(value, str):
        items = tuple(value)
        kinds = {type(item) for item in items if item is not None}
        if len(kinds) > 1 or not kinds <= _SCALAR_SET:
            return None
        if limit is not None and kinds == {str}:
            items = tuple(None if item is None else item[:limit] for item in items)
        return items
    # an enum or another subclass of a scalar: its plain value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return value[:limit]
    return None


class SpanAttributes:
    """Attributes under the span limits; the dict is what the encoder reads."""

    __slots__ = ("dropped", "items")

    def __init__(self) -> None:
        self.items: dict[str, Any] = {}
        self.dropped = 0

    def update(self, attributes: Mapping[str, object], limits: SpanLimits) -> None:
        items = self.items
        length = limits.value_length
        for key, value in attributes.items():
            # the usual case inline: a plain scalar that needs no cutting
            if type(value) in _SCALAR_SET and (length is None or type(value) is not str):
                cleaned: Any = value
            else:
                cleaned = _clean(value, length)
                if cleaned is None:
                    continue
            if len(items) < limits.attributes or key in items:
                items[key] = cleaned
            else:
                self.dropped += 1


def _attributes(attributes: types.Attributes, limits: SpanLimits) -> SpanAttributes:
    kept = SpanAttributes()
    if attributes:
        kept.update(attributes, limits)
    return kept


@dataclass(frozen=True, slots=True)
class SpanEvent:
    name: str
    time_ns: int
    attributes: SpanAttributes


@dataclass(frozen=True, slots=True)
class SpanLink:
    context: SpanContext
    attributes: SpanAttributes


class LeanSpan(trace.Span):
    """A recording span. Once ended it is the export queue's :class:`SpanRecord` and no
    longer changes: later calls are ignored, as the specification asks."""

    __slots__ = (
        "_context",
        "_limits",
        "_queue",
        "attributes",
        "dropped_events",
        "dropped_links",
        "end_ns",
        "events",
        "kind",
        "links",
        "name",
        "parent",
        "scope",
        "start_ns",
        "status_code",
        "status_message",
    )

    def __init__(
        self,
        queue: ExportQueue,
        limits: SpanLimits,
        scope: Scope,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: SpanAttributes,
        links: list[SpanLink] | None,
        dropped_links: int,
        start_ns: int,
    ) -> None:
        self._queue = queue
        self._limits = limits
        self._context = context
        self.scope = scope
        self.name = name
        self.parent = parent
        self.kind = kind
        self.attributes = attributes
        self.links = links
        self.dropped_links = dropped_links
        self.events: list[SpanEvent] | None = None
        self.dropped_events = 0
        self.start_ns = start_ns
        self.end_ns = 0
        self.status_code = StatusCode.UNSET
        self.status_message = ""

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return not self.end_ns

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if not self.end_ns:
            self.attributes.update({key: value}, self._limits)

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        if not self.end_ns:
            self.attributes.update(attributes, self._limits)

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        if self.end_ns:
            return
        if self.events is None:
            self.events = []
        if len(self.events) >= self._limits.events:
            self.dropped_events += 1
            return
        self.events.append(
            SpanEvent(
                name,
                time.time_ns() if timestamp is None else timestamp,
                _attributes(attributes, self._limits),
            )
        )

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if self.end_ns or not context.is_valid:
            return
        if self.links is None:
            self.links = []
        if len(self.links) >= self._limits.links:
            self.dropped_links += 1
            return
        self.links.append(SpanLink(context, _attributes(attributes, self._limits)))

    def update_name(self, name: str) -> None:
        if not self.end_ns:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # as in the SDK: OK is final, UNSET changes nothing, a description goes with ERROR only
        if self.end_ns or self.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            code, message = status.status_code, status.description
        else:
            code, message = status, description
        if code is StatusCode.UNSET:
            return
        self.status_code = code
        self.status_message = (message or "") if code is StatusCode.ERROR else ""

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        details: dict[str, types.AnyValue] = {
            "exception.type": qualname if module in ("builtins", "") else f"{module}.{qualname}",
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            details.update(attributes)
        self.add_event("exception", details, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.end_ns:
            return
        self.end_ns = time.time_ns() if end_time is None else end_time
        self._queue.add(self)


SpanRecord = LeanSpan
"""An ended :class:`LeanSpan`, as exporters receive it."""


class LeanTracer(trace.Tracer):
    """Starts spans for one instrumentation scope."""

    def __init__(self, provider: LeanTracerProvider, scope: Scope) -> None:
        self._provider = provider
        self._scope = scope

    def start_span(
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        provider = self._provider
        parent: SpanContext | None = trace.get_current_span(context).get_span_context()
        if parent is not None and parent.is_valid:
            trace_id = parent.trace_id
            state = parent.trace_state
        else:
            parent = None
            trace_id = _ids.getrandbits(128) or 1
            state = _EMPTY_STATE
        span_id = _ids.getrandbits(64) or 1
        if provider.shut_down or not provider.sampler.sampled(parent, trace_id):
            return NonRecordingSpan(SpanContext(trace_id, span_id, False, _NOT_SAMPLED, state))
        limits = provider.limits
        kept_links: list[SpanLink] | None = None
        dropped_links = 0
        if links:
            kept_links = []
            for link in links:
                if not link.context.is_valid:
                    continue
                if len(kept_links) < limits.links:
                    kept_links.append(SpanLink(link.context, _attributes(link.attributes, limits)))
                else:
                    dropped_links += 1
        return LeanSpan(
            provider.queue,
            limits,
            self._scope,
            name,
            SpanContext(trace_id, span_id, False, _SAMPLED, state),
            parent,
            kind,
            _attributes(attributes, limits),
            kept_links,
            dropped_links,
            time.time_ns() if start_time is None else start_time,
        )

    # use_span gives it the SDK's handling of exceptions (the API's own decorator is private)
    @contextlib.contextmanager
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        with trace.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """The batching of exports (the ``OTEL_BSP_*`` variables, with the SDK's defaults)."""

    delay_s: float = 5.0
    max_queue: int = 2048
    batch_size: int = 512
    export_timeout_s: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> QueueSettings:
        max_queue = env_int(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048, minimum=1)
        batch_size = env_int(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, minimum=1)
        return cls(
            delay_s=env_float(env, "OTEL_BSP_SCHEDULE_DELAY", 5000, minimum=0) / 1000,
            max_queue=max_queue,
            batch_size=min(batch_size, max_queue),
            export_timeout_s=env_float(env, "OTEL_BSP_EXPORT_TIMEOUT", 30000, minimum=0) / 1000,
        )


class ExportQueue:
    """Ended spans wait here for the export thread, which sends a batch when
    ``batch_size`` are waiting or ``delay_s`` has passed. A full queue drops new spans and
    counts them: tracing never slows the calls it watches."""

    def __init__(self, exporter: SpanExporter, settings: QueueSettings) -> None:
        self._exporter = exporter
        self._settings = settings
        self._spans: collections.deque[LeanSpan] = collections.deque()
        self._wake = threading.Event()
        self._export_lock = threading.Lock()
        self._stopping = False
        self.dropped = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._work, name="scoremesh-span-export", daemon=True)
        self._thread.start()

    def add(self, span: LeanSpan) -> None:
        spans = self._spans
        if len(spans) >= self._settings.max_queue:
            self.dropped += 1
            return
        spans.append(span)
        if len(spans) >= self._settings.batch_size and not self._wake.is_set():
            self._wake.set()

    def _work(self) -> None:
        # As the SDK's batch processor: woken by a full batch, it sends full batches only;
        # what is left waits for the next full batch or the delay. Sending the remainder at
        # once would turn a steady stream of spans into exports of a few spans each, one
        # after another, each paying for a request in both processes.
        while not self._stopping:
            woken = self._wake.wait(self._settings.delay_s)
            self._wake.clear()
            self._export_waiting(full_batches_only=woken and not self._stopping)

    def _export_waiting(self, deadline: float | None = None, *, full_batches_only: bool = False) -> bool:
        """Exports what is queued now (with ``full_batches_only``, while a whole batch is), a
        batch at a time; False when ``deadline`` (a monotonic time) passed first."""
        smallest = self._settings.batch_size if full_batches_only else 1
        with self._export_lock:
            spans = self._spans
            while len(spans) >= smallest:
                if deadline is not None and time.monotonic() > deadline:
                    return False
                count = min(len(spans), self._settings.batch_size)
                batch = [spans.popleft() for _ in range(count)]
                try:
                    delivered = self._exporter.export(batch)
                except Exception:
                    log.exception("exporting %d spans failed", count)
                    delivered = False
                if not delivered:
                    self.failed += count
        return True

    def flush(self, timeout_s: float) -> bool:
        return self._export_waiting(time.monotonic() + timeout_s)

    def shutdown(self) -> None:
        """Exports what is left (within the export timeout) and closes the exporter."""
        timeout_s = self._settings.export_timeout_s
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)
        self._export_waiting(time.monotonic() + timeout_s)
        self._exporter.shutdown()
        if self.dropped or self.failed:
            log.warning(
                "tracing dropped %d spans (queue full) and lost %d (export failed)", self.dropped, self.failed
            )


class LeanTracerProvider(trace.TracerProvider):
    """The process's tracer provider: one sampler, one set of limits, one export queue."""

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        sampler: Sampler,
        limits: SpanLimits | None = None,
        queue: QueueSettings | None = None,
    ) -> None:
        self.sampler = sampler
        self.limits = limits or SpanLimits()
        self.queue = ExportQueue(exporter, queue or QueueSettings())
        self.shut_down = False
        self._tracers: dict[Scope, LeanTracer] = {}

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: types.Attributes = None,
    ) -> trace.Tracer:
        scope = Scope(instrumenting_module_name or "", instrumenting_library_version or "", schema_url or "")
        tracer = self._tracers.get(scope)
        if tracer is None:
            tracer = self._tracers[scope] = LeanTracer(self, scope)
        return tracer

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.queue.flush(timeout_millis / 1000)

    def shutdown(self) -> None:
        if not self.shut_down:
            self.shut_down = True
            self.queue.shutdown()
