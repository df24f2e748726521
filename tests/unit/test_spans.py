"""The lean tracer provider: the SDK's sampling decisions, span semantics, limits, the
export queue, and its OTLP encoding read back with opentelemetry-proto's own messages."""

from __future__ import annotations

import enum
import random
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, cast

import pytest
from opentelemetry import propagate, trace

# the SDK's own attribute encoder, to hold ours to it
from opentelemetry.exporter.otlp.proto.common._internal import _encode_attributes
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from services.mesh.otlp import ExportSettings, encode_export_request
from services.mesh.spans import (
    LeanSpan,
    LeanTracerProvider,
    QueueSettings,
    Sampler,
    SpanLimits,
    SpanRecord,
    resource_from_env,
)


class Level(enum.IntEnum):
    HIGH = 2


ALWAYS = Sampler(parent_based=True, bound=1 << 64)
RESOURCE = {"service.name": "tests", "deployment.environment": "unit"}


class Collected:
    """A span exporter that keeps what it is given (or refuses it, when told to)."""

    def __init__(self) -> None:
        self.batches: list[list[SpanRecord]] = []
        self.refuse = False
        self.raise_error = False
        self.exported = threading.Event()
        self.shut_down = False

    def export(self, spans: Sequence[SpanRecord]) -> bool:
        if self.raise_error:
            raise RuntimeError("collector exploded")
        self.batches.append(list(spans))
        self.exported.set()
        return not self.refuse

    def shutdown(self) -> None:
        self.shut_down = True

    @property
    def spans(self) -> list[SpanRecord]:
        return [span for batch in self.batches for span in batch]


@pytest.fixture
def collected() -> Collected:
    return Collected()


@pytest.fixture
def provider(collected: Collected) -> Iterator[LeanTracerProvider]:
    provider = LeanTracerProvider(collected, sampler=ALWAYS, queue=QueueSettings(delay_s=60, batch_size=512))
    yield provider
    provider.shutdown()


def _decode(spans: Sequence[SpanRecord]) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest.FromString(encode_export_request(RESOURCE, spans))


def _context(trace_id: int, span_id: int, *, sampled: bool, remote: bool = True) -> SpanContext:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return SpanContext(trace_id, span_id, remote, flags)


# sampling


@pytest.mark.parametrize("ratio", [0.0, 0.001, 0.1, 0.5, 0.9, 1.0])
def test_ratio_sampling_decides_as_the_sdk_does(ratio: float) -> None:
    ours = Sampler.from_env({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": str(ratio)})
    sdk = TraceIdRatioBased(ratio)
    ids = random.Random(7)
    kept = 0
    for _ in range(5000):
        trace_id = ids.getrandbits(128)
        expected = sdk.should_sample(None, trace_id, "span").decision is Decision.RECORD_AND_SAMPLE
        assert ours.sampled(None, trace_id) is expected
        kept += expected
    assert abs(kept / 5000 - ratio) < 0.05


@pytest.mark.parametrize("remote", [True, False])
@pytest.mark.parametrize("parent_sampled", [True, False])
def test_parent_based_sampling_follows_the_parent_as_the_sdk_does(remote: bool, parent_sampled: bool) -> None:
    ours = Sampler.from_env(
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"}
    )
    sdk = ParentBased(TraceIdRatioBased(0.5))
    ids = random.Random(11)
    for _ in range(500):
        trace_id = ids.getrandbits(128)
        parent = _context(trace_id, 0xAB, sampled=parent_sampled, remote=remote)
        parent_context = trace.set_span_in_context(NonRecordingSpan(parent))
        expected = sdk.should_sample(parent_context, trace_id, "span").decision is Decision.RECORD_AND_SAMPLE
        assert ours.sampled(parent, trace_id) is expected is parent_sampled
        # a root decides by its trace id alone
        root_expected = sdk.should_sample(None, trace_id, "span").decision is Decision.RECORD_AND_SAMPLE
        assert ours.sampled(None, trace_id) is root_expected


def test_samplers_not_based_on_the_parent_ignore_its_flag() -> None:
    parent = _context(5, 6, sampled=True)
    assert Sampler.from_env({"OTEL_TRACES_SAMPLER": "always_off"}).sampled(parent, 5) is False
    assert Sampler.from_env({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}).sampled(parent, 5) is True
    assert Sampler.from_env({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}).sampled(None, 5) is False
    assert Sampler.from_env({}).sampled(None, 5) is True  # parentbased_always_on by default


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER"),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "-0.1"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "nan"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        ({"OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "many"}, "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT"),
        ({"OTEL_SPAN_LINK_COUNT_LIMIT": "1.5"}, "OTEL_SPAN_LINK_COUNT_LIMIT"),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "0"}, "OTEL_BSP_MAX_QUEUE_SIZE"),
    ],
)
def test_bad_settings_name_their_variable(env: dict[str, str], named: str) -> None:
    def read_all() -> None:
        Sampler.from_env(env)
        SpanLimits.from_env(env)
        QueueSettings.from_env(env)

    with pytest.raises(ValueError, match=named):
        read_all()


def test_unsampled_spans_carry_the_decision_on(provider: LeanTracerProvider, collected: Collected) -> None:
    provider.sampler = Sampler(parent_based=True, bound=0)
    tracer = provider.get_tracer("tests")
    root = tracer.start_span("root")
    assert not root.is_recording()
    context = root.get_span_context()
    assert context.is_valid
    assert not context.trace_flags.sampled
    # the next hop learns the decision from traceparent
    with trace.use_span(root):
        headers: dict[str, str] = {}
        propagate.inject(headers)
        child = tracer.start_span("child")
    assert headers["traceparent"].endswith("-00")
    assert child.get_span_context().trace_id == context.trace_id
    assert not child.is_recording()
    root.end()
    assert provider.force_flush()
    assert collected.spans == []


# spans


def test_a_child_continues_its_parent(provider: LeanTracerProvider) -> None:
    tracer = provider.get_tracer("tests", "1.2")
    remote = _context(0x1234, 0x99, sampled=True)
    with tracer.start_as_current_span(
        "server", trace.set_span_in_context(NonRecordingSpan(remote))
    ) as server:
        with tracer.start_as_current_span("inner") as inner:
            assert trace.get_current_span() is inner
        assert trace.get_current_span() is server
    assert isinstance(server, LeanSpan)
    assert isinstance(inner, LeanSpan)
    assert server.get_span_context().trace_id == inner.get_span_context().trace_id == 0x1234
    assert server.parent == remote
    assert inner.parent == server.get_span_context()
    assert not server.is_recording()
    assert not inner.is_recording()


def test_an_exception_leaving_a_span_is_recorded_and_marks_it(provider: LeanTracerProvider) -> None:
    tracer = provider.get_tracer("tests")
    with pytest.raises(KeyError), tracer.start_as_current_span("failing") as span:
        raise KeyError("gone")
    assert isinstance(span, LeanSpan)
    assert span.status_code is StatusCode.ERROR
    assert span.status_message == "KeyError: 'gone'"
    assert span.events is not None
    (event,) = span.events
    assert event.name == "exception"
    assert event.attributes.items["exception.type"] == "KeyError"
    assert "raise KeyError" in event.attributes.items["exception.stacktrace"]


def test_status_follows_the_specification(provider: LeanTracerProvider) -> None:
    span = provider.get_tracer("tests").start_span("s")
    assert isinstance(span, LeanSpan)

    def status() -> tuple[StatusCode, str]:
        return span.status_code, span.status_message

    span.set_status(StatusCode.UNSET)
    assert status() == (StatusCode.UNSET, "")
    span.set_status(Status(StatusCode.ERROR, "broken"))
    assert status() == (StatusCode.ERROR, "broken")
    span.set_status(StatusCode.OK, "ignored description")
    assert status() == (StatusCode.OK, "")
    span.set_status(StatusCode.ERROR, "too late")  # OK is final
    assert status() == (StatusCode.OK, "")


def test_an_ended_span_no_longer_changes(provider: LeanTracerProvider, collected: Collected) -> None:
    span = provider.get_tracer("tests").start_span("s", attributes={"a": 1})
    assert isinstance(span, LeanSpan)
    span.end(end_time=123)
    span.end(end_time=456)
    span.set_attribute("b", 2)
    span.add_event("late")
    span.update_name("renamed")
    span.set_status(StatusCode.ERROR)
    assert (span.name, span.end_ns, span.attributes.items, span.events) == ("s", 123, {"a": 1}, None)
    assert span.status_code is StatusCode.UNSET
    assert provider.force_flush()
    assert collected.spans == [span]  # queued once


def test_attribute_values_are_kept_as_the_api_allows(provider: LeanTracerProvider) -> None:
    span = provider.get_tracer("tests").start_span("s")
    assert isinstance(span, LeanSpan)
    span.set_attributes(
        {
            "str": "x",
            "bool": True,
            "int": -3,
            "float": 0.5,
            "list": ["a", "b"],
            "ints": (1, 2),
            "holes": ["a", None],
            "bytes": b"text",
            "code": cast(Any, StatusCode.ERROR),  # a plain enum is no scalar: dropped
            "level": Level.HIGH,  # an int enum is kept as its int
            "mixed": [1, "a"],
            "none": None,
            "dict": {"a": 1},
        }
    )
    assert span.attributes.items == {
        "str": "x",
        "bool": True,
        "int": -3,
        "float": 0.5,
        "list": ("a", "b"),
        "ints": (1, 2),
        "holes": ("a", None),
        "bytes": "text",
        "level": 2,
    }
    assert type(span.attributes.items["level"]) is int


def test_limits_drop_and_count(collected: Collected) -> None:
    limits = SpanLimits(attributes=2, events=1, links=1, value_length=3)
    provider = LeanTracerProvider(collected, sampler=ALWAYS, limits=limits)
    try:
        links = [Link(_context(1, n, sampled=True)) for n in (1, 2, 3)] + [Link(trace.INVALID_SPAN_CONTEXT)]
        span = provider.get_tracer("tests").start_span(
            "s", attributes={"a": "abcdef", "b": ["xyzw"]}, links=links
        )
        assert isinstance(span, LeanSpan)
        span.set_attribute("c", 1)
        span.set_attribute("a", "replaced")  # an existing key is no new attribute
        span.add_event("one")
        span.add_event("two")
        span.add_link(_context(1, 4, sampled=True))
        assert span.attributes.items == {"a": "rep", "b": ("xyz",)}
        assert span.attributes.dropped == 1
        assert span.events is not None
        assert len(span.events) == 1
        assert span.dropped_events == 1
        assert span.links is not None
        assert len(span.links) == 1
        assert span.dropped_links == 3
    finally:
        provider.shutdown()


def test_limits_come_from_the_standard_variables() -> None:
    limits = SpanLimits.from_env(
        {
            "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "5",
            "OTEL_SPAN_EVENT_COUNT_LIMIT": "6",
            "OTEL_SPAN_LINK_COUNT_LIMIT": "7",
            "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "8",
        }
    )
    assert limits == SpanLimits(attributes=5, events=6, links=7, value_length=8)
    assert SpanLimits.from_env({}) == SpanLimits()
    span_own = SpanLimits.from_env(
        {"OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "8", "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": "4"}
    )
    assert span_own.value_length == 4


def test_resource_from_the_standard_variables() -> None:
    env = {"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs, team=a%2Cb,k8s.pod.name=p-1"}
    resource = resource_from_env(env, "scoremesh-scoring", "1.0")
    assert resource["service.name"] == "from-attrs"
    assert resource["team"] == "a,b"
    assert resource["k8s.pod.name"] == "p-1"
    assert resource["telemetry.sdk.name"] == "scoremesh"
    assert resource_from_env({**env, "OTEL_SERVICE_NAME": "own"}, "x", "1")["service.name"] == "own"
    assert resource_from_env({}, "scoremesh-scoring", "1")["service.name"] == "scoremesh-scoring"
    with pytest.raises(ValueError, match="OTEL_RESOURCE_ATTRIBUTES"):
        resource_from_env({"OTEL_RESOURCE_ATTRIBUTES": "novalue"}, "x", "1")


# the export queue


def test_a_full_batch_is_exported_without_waiting_for_the_delay(collected: Collected) -> None:
    provider = LeanTracerProvider(collected, sampler=ALWAYS, queue=QueueSettings(delay_s=60, batch_size=4))
    try:
        tracer = provider.get_tracer("tests")
        for n in range(4):
            tracer.start_span(f"s{n}").end()
        assert collected.exported.wait(10)
        assert [span.name for span in collected.batches[0]] == ["s0", "s1", "s2", "s3"]
    finally:
        provider.shutdown()


def test_between_delays_only_full_batches_are_exported(collected: Collected) -> None:
    provider = LeanTracerProvider(collected, sampler=ALWAYS, queue=QueueSettings(delay_s=60, batch_size=4))
    try:
        tracer = provider.get_tracer("tests")
        # held, so that all ten are queued when the thread wakes for the first full batch
        with provider.queue._export_lock:
            for n in range(10):
                tracer.start_span(f"s{n}").end()
        deadline = time.monotonic() + 10
        while len(collected.batches) < 2 and time.monotonic() < deadline:
            collected.exported.wait(0.05)
            collected.exported.clear()
        # the thread holds the lock while it exports: once it is ours, the thread is done
        with provider.queue._export_lock:
            assert [len(batch) for batch in collected.batches] == [4, 4]
            # the two left wait for the delay or a flush, not sent as an export of their own
            assert len(provider.queue._spans) == 2
        assert provider.force_flush()
        assert [len(batch) for batch in collected.batches] == [4, 4, 2]
    finally:
        provider.shutdown()


def test_the_delay_sends_a_partial_batch(collected: Collected) -> None:
    provider = LeanTracerProvider(
        collected, sampler=ALWAYS, queue=QueueSettings(delay_s=0.05, batch_size=512)
    )
    try:
        provider.get_tracer("tests").start_span("alone").end()
        assert collected.exported.wait(10)
        assert [span.name for span in collected.spans] == ["alone"]
    finally:
        provider.shutdown()


def test_a_full_queue_drops_new_spans(collected: Collected) -> None:
    provider = LeanTracerProvider(
        collected, sampler=ALWAYS, queue=QueueSettings(delay_s=60, max_queue=3, batch_size=3)
    )
    # holding the export lock keeps the thread from draining the queue meanwhile
    with provider.queue._export_lock:
        tracer = provider.get_tracer("tests")
        for n in range(5):
            tracer.start_span(f"s{n}").end()
        assert provider.queue.dropped == 2
    provider.shutdown()
    assert [span.name for span in collected.spans] == ["s0", "s1", "s2"]


def test_shutdown_exports_what_is_left_and_failures_are_counted(collected: Collected) -> None:
    provider = LeanTracerProvider(collected, sampler=ALWAYS, queue=QueueSettings(delay_s=60))
    tracer = provider.get_tracer("tests")
    tracer.start_span("kept").end()
    collected.refuse = True
    provider.shutdown()
    assert [span.name for span in collected.spans] == ["kept"]
    assert provider.queue.failed == 1
    assert collected.shut_down
    # after shutdown nothing more is recorded
    assert not tracer.start_span("after").is_recording()


def test_an_exporter_that_raises_does_not_stop_the_thread(collected: Collected) -> None:
    provider = LeanTracerProvider(collected, sampler=ALWAYS, queue=QueueSettings(delay_s=60, batch_size=1))
    try:
        collected.raise_error = True
        provider.get_tracer("tests").start_span("lost").end()
        assert provider.force_flush()
        assert provider.queue.failed == 1
        collected.raise_error = False
        provider.get_tracer("tests").start_span("kept").end()
        assert collected.exported.wait(10)
        assert [span.name for span in collected.spans] == ["kept"]
    finally:
        provider.shutdown()


# OTLP encoding


def test_the_encoding_reads_back_field_by_field(provider: LeanTracerProvider) -> None:
    tracer = provider.get_tracer("tests.scope", "2.0")
    state = TraceState([("vendor", "v1")])
    remote = SpanContext(0x0123456789ABCDEF0123456789ABCDEF, 0x1122334455667788, True, TraceFlags(1), state)
    linked = SpanContext(0xAA, 0xBB, False, TraceFlags(1), TraceState([("x", "y")]))
    attributes: dict[str, Any] = {
        "s": "text é",
        "b": False,
        "i": -(2**40),
        "f": 1.25,
        "strings": ("a", "b"),
        "ints": (1, -2),
        "floats": (0.5,),
        "bools": (True, False),
        "holes": ("a", None),
    }
    server = tracer.start_span(
        "/inference.GRPCInferenceService/ModelInfer",
        trace.set_span_in_context(NonRecordingSpan(remote)),
        SpanKind.SERVER,
        attributes,
        links=[Link(linked, {"link.n": 3})],
        start_time=1_000,
    )
    server.add_event("queued", {"rows": 4}, timestamp=1_500)
    server.set_status(Status(StatusCode.ERROR, "UNAVAILABLE: gone"))
    server.end(end_time=2_000)
    child = tracer.start_span("backend", trace.set_span_in_context(server), start_time=1_200)
    child.set_status(StatusCode.OK)
    child.end(end_time=1_800)
    assert isinstance(server, LeanSpan)
    assert isinstance(child, LeanSpan)

    (resource_spans,) = _decode([server, child]).resource_spans
    assert {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes} == RESOURCE
    (scope_spans,) = resource_spans.scope_spans
    assert (scope_spans.scope.name, scope_spans.scope.version) == ("tests.scope", "2.0")
    encoded_server, encoded_child = scope_spans.spans

    assert encoded_server.trace_id == remote.trace_id.to_bytes(16, "big")
    assert encoded_server.span_id == server.get_span_context().span_id.to_bytes(8, "big")
    assert encoded_server.parent_span_id == remote.span_id.to_bytes(8, "big")
    assert encoded_server.trace_state == "vendor=v1"
    assert encoded_server.name == "/inference.GRPCInferenceService/ModelInfer"
    assert encoded_server.kind == ProtoSpan.SpanKind.SPAN_KIND_SERVER
    assert (encoded_server.start_time_unix_nano, encoded_server.end_time_unix_nano) == (1_000, 2_000)
    # the attributes as the SDK's own encoder writes them
    assert list(encoded_server.attributes) == _encode_attributes(dict(server.attributes.items))
    (event,) = encoded_server.events
    assert (event.name, event.time_unix_nano) == ("queued", 1_500)
    assert list(event.attributes) == _encode_attributes({"rows": 4})
    (link,) = encoded_server.links
    assert (link.trace_id, link.span_id) == ((0xAA).to_bytes(16, "big"), (0xBB).to_bytes(8, "big"))
    assert link.trace_state == "x=y"
    assert list(link.attributes) == _encode_attributes({"link.n": 3})
    assert link.flags == 0x100 | 0x01
    assert (encoded_server.status.code, encoded_server.status.message) == (2, "UNAVAILABLE: gone")
    assert encoded_server.flags == 0x100 | 0x200 | 0x01  # has is_remote, is remote, sampled

    assert encoded_child.parent_span_id == encoded_server.span_id
    assert encoded_child.kind == ProtoSpan.SpanKind.SPAN_KIND_INTERNAL
    assert encoded_child.status.code == 1
    assert encoded_child.status.message == ""
    assert encoded_child.flags == 0x100 | 0x01  # a local parent
    assert encoded_child.trace_state == "vendor=v1"  # inherited


def test_dropped_counts_and_scopes_are_encoded(collected: Collected) -> None:
    provider = LeanTracerProvider(
        collected, sampler=ALWAYS, limits=SpanLimits(attributes=1, events=0, links=0)
    )
    try:
        first = provider.get_tracer("one").start_span("a", attributes={"x": 1, "y": 2})
        first.add_event("dropped")
        first.add_link(_context(1, 2, sampled=True))
        first.end()
        second = provider.get_tracer("two").start_span("b")
        second.end()
        third = provider.get_tracer("one").start_span("c")
        third.end()
        assert isinstance(first, LeanSpan)
        assert isinstance(second, LeanSpan)
        assert isinstance(third, LeanSpan)
        (resource_spans,) = _decode([first, second, third]).resource_spans
        scopes = {
            group.scope.name: [span.name for span in group.spans] for group in resource_spans.scope_spans
        }
        assert scopes == {"one": ["a", "c"], "two": ["b"]}
        encoded = resource_spans.scope_spans[0].spans[0]
        assert (
            encoded.dropped_attributes_count,
            encoded.dropped_events_count,
            encoded.dropped_links_count,
        ) == (
            1,
            1,
            1,
        )
        assert encoded.status.code == 0  # unset: no status field
    finally:
        provider.shutdown()


def test_repeated_attributes_encode_alike_whatever_their_type(provider: LeanTracerProvider) -> None:
    tracer = provider.get_tracer("tests")
    # True == 1 == 1.0 in Python: the encoder's cache must keep them apart
    values: tuple[Any, ...] = (True, 1, 1.0, "1", True, 1)
    spans = [cast(LeanSpan, tracer.start_span("s", attributes={"v": value})) for value in values]
    for span in spans:
        span.end()
    assert all(isinstance(span, LeanSpan) for span in spans)
    encoded = _decode(spans).resource_spans[0].scope_spans[0].spans
    kinds = [span.attributes[0].value.WhichOneof("value") for span in encoded]
    assert kinds == ["bool_value", "int_value", "double_value", "string_value", "bool_value", "int_value"]


# export settings


def test_export_settings_from_the_standard_variables() -> None:
    settings = ExportSettings.from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
            "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20x, tenant=a",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip",
        }
    )
    assert settings.protocol == "http/protobuf"
    assert settings.endpoint == "http://collector:4318/v1/traces"
    assert settings.headers == (("authorization", "Bearer x"), ("tenant", "a"))
    assert settings.timeout_s == 2.5
    assert settings.gzip
    own = ExportSettings.from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:1/custom"})
    assert own.endpoint == "http://c:1/custom"
    grpc_settings = ExportSettings.from_env(
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}
    )
    assert (grpc_settings.protocol, grpc_settings.endpoint) == ("grpc", "http://c:4317")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "0"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
        ({"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"}, "OTEL_EXPORTER_OTLP_COMPRESSION"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "novalue"}, "OTEL_EXPORTER_OTLP_HEADERS"),
    ],
)
def test_bad_export_settings_name_their_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        ExportSettings.from_env(env)
