"""The span store, the OTLP conversion in front of it, and what ``scoremesh traces`` prints."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime
import json
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from services.mesh.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.traces.command import parse_since
from services.traces.model import AttributeValue, SpanRecord, SpanStatus, StoredSpan, TraceQuery
from services.traces.otlp import (
    decode_export,
    request_from_json,
    request_from_protobuf,
    response_for,
    span_record,
)
from services.traces.render import span_json, summary_json, trace_table, tree_order, waterfall
from services.traces.store import TraceStore
from services.traces.writer import SpanWriter

T0 = 1_700_000_000_000_000_000  # 2023-11-14 22:13:20 UTC
MS = 1_000_000
TRACE = "0af7651916cd43dd8448eb211c80319c"
OTHER = "4bf92f3577b34da6a3ce929d0e0e4736"


def span(
    span_id: str,
    parent: str,
    name: str,
    service: str,
    start_ms: float,
    end_ms: float,
    *,
    trace_id: str = TRACE,
    error: str | None = None,
    t0: int = T0,
    attributes: dict[str, AttributeValue] | None = None,
) -> SpanRecord:
    return SpanRecord(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent,
        name=name,
        kind=2,
        service=service,
        scope="test",
        start_ns=t0 + int(start_ms * MS),
        end_ns=t0 + int(end_ms * MS),
        status_code=SpanStatus.ERROR if error is not None else SpanStatus.UNSET,
        status_message=error or "",
        attributes=attributes or {},
    )


def _any_value(value: AttributeValue) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    assert isinstance(value, str), value
    return AnyValue(string_value=value)


def stored(records: Sequence[SpanRecord]) -> list[StoredSpan]:
    """The records as the receiver stores them: exported as OTLP protobuf, then decoded."""
    request = ExportTraceServiceRequest()
    for record in records:
        resource = request.resource_spans.add()
        resource.resource.attributes.add(key="service.name", value=AnyValue(string_value=record.service))
        scope = resource.scope_spans.add()
        scope.scope.name = record.scope
        scope.spans.add(
            trace_id=bytes.fromhex(record.trace_id),
            span_id=bytes.fromhex(record.span_id),
            parent_span_id=bytes.fromhex(record.parent_span_id),
            name=record.name,
            kind=record.kind,
            start_time_unix_nano=record.start_ns,
            end_time_unix_nano=record.end_ns,
            status=Status(code=record.status_code, message=record.status_message),  # type: ignore[arg-type]
            attributes=[
                KeyValue(key=key, value=_any_value(value)) for key, value in record.attributes.items()
            ],
        )
    decoded = decode_export(request_from_protobuf(request.SerializeToString()))
    assert decoded.rejected == 0
    return decoded.spans


def scoring_trace() -> list[SpanRecord]:
    """A request through the gateway, scoring (with a registry lookup) and Triton."""
    return [
        span(
            "a000000000000001",
            "",
            "POST /v2/models/{name}/infer",
            "scoremesh-gateway",
            0,
            12.5,
            attributes={"http.route": "/v2/models/{name}/infer", "http.status_code": 504},
        ),
        span(
            "a000000000000002",
            "a000000000000001",
            "inference.GRPCInferenceService/ModelInfer",
            "scoremesh-scoring",
            1,
            11.5,
            error="deadline exceeded after 10 ms",
            attributes={"rpc.method": "ModelInfer", "scoremesh.model": "iris", "scoremesh.version": 3},
        ),
        span(
            "a000000000000003",
            "a000000000000002",
            "SELECT versions",
            "scoremesh-registry",
            1.5,
            1.9,
            attributes={
                "db.statement": (
                    "SELECT version, sha256, size_bytes\n  FROM versions WHERE model = $1 AND version = $2"
                )
            },
        ),
        span(
            "a000000000000004",
            "a000000000000002",
            "batch",
            "scoremesh-scoring",
            2,
            10,
            attributes={"scoremesh.backend": "triton", "scoremesh.batch_size": 8},
        ),
        span(
            "a000000000000005",
            "a000000000000004",
            "InferRequest",
            "triton",
            3,
            9.5,
            attributes={"triton.model_name": "iris_3"},
        ),
    ]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TraceStore]:
    opened = TraceStore.open(tmp_path / "traces" / "spans.sqlite3")
    try:
        yield opened
    finally:
        opened.close()


# the store


def test_a_trace_is_summarised_from_its_spans(store: TraceStore) -> None:
    assert store.add(stored(scoring_trace())) == 5
    [summary] = store.traces(TraceQuery())
    assert summary.trace_id == TRACE
    assert summary.root_name == "POST /v2/models/{name}/infer"
    assert summary.root_service == "scoremesh-gateway"
    assert summary.services == ["scoremesh-gateway", "scoremesh-registry", "scoremesh-scoring", "triton"]
    assert (summary.span_count, summary.error_count, summary.failed) == (5, 1, True)
    assert summary.duration_ns == 12_500_000
    # every field read back, in start order
    assert store.spans(TRACE) == [dataclasses.replace(s, events=[], links=[]) for s in scoring_trace()]


def test_spans_arriving_in_pieces_and_twice(store: TraceStore) -> None:
    spans = scoring_trace()
    # Triton's and scoring's spans come first: until the root arrives, the earliest span
    # whose parent is missing stands in for it
    assert store.add(stored(spans[1:])) == 4
    [summary] = store.traces(TraceQuery())
    assert (summary.root_name, summary.span_count) == ("inference.GRPCInferenceService/ModelInfer", 4)
    assert store.add(stored(spans)) == 1  # an exporter's retry adds nothing twice
    [summary] = store.traces(TraceQuery())
    assert (summary.root_name, summary.span_count, summary.error_count) == (
        "POST /v2/models/{name}/infer",
        5,
        1,
    )
    assert store.add([]) == 0


def test_filters_and_order(store: TraceStore) -> None:
    store.add(stored(scoring_trace()))
    store.add(
        stored(
            [
                span("b000000000000001", "", "Register", "scoremesh-training", 1000, 1002, trace_id=OTHER),
                span(
                    "b000000000000002",
                    "b000000000000001",
                    "CreateVersion",
                    "scoremesh-registry",
                    1000.5,
                    1001,
                    trace_id=OTHER,
                    attributes={"scoremesh.model": "digits"},
                ),
            ]
        )
    )

    def ids(**query: object) -> list[str]:
        return [t.trace_id for t in store.traces(TraceQuery(**query))]  # type: ignore[arg-type]

    assert ids() == [TRACE, OTHER]  # slowest first
    assert ids(order="start") == [OTHER, TRACE]
    assert ids(limit=1) == [TRACE]
    assert ids(service="scoremesh-registry") == [TRACE, OTHER]
    assert ids(service="training") == [OTHER]  # the scoremesh- prefix may be left out
    assert ids(service="triton") == [TRACE]
    assert ids(service="nobody") == []
    assert ids(model="iris") == [TRACE]
    assert ids(model="digits") == [OTHER]
    assert ids(failed=True) == [TRACE]
    assert ids(failed=False) == [OTHER]
    assert ids(since_ns=T0 + 500 * MS) == [OTHER]
    assert ids(service="scoring", failed=False) == []
    assert store.resolve("0af7") == [TRACE]
    assert store.resolve("0") == [TRACE]
    assert store.resolve("") == [TRACE, OTHER]
    assert store.resolve("ff") == []
    assert store.count() == (2, 7)


def test_prune_drops_old_traces_then_the_oldest_beyond_the_budget(store: TraceStore) -> None:
    hour = 3600 * 10**9
    for i in range(10):  # ten traces of three spans, an hour apart, the last one now
        trace_id = f"{i + 1:032x}"
        start = T0 - (9 - i) * hour
        store.add(
            stored(
                [
                    span(f"{i + 1:04x}{j + 1:012x}", "", f"t{i}", "svc", 0, 1, trace_id=trace_id, t0=start)
                    for j in range(3)
                ]
            )
        )
    assert store.count() == (10, 30)
    assert store.prune(max_spans=1000, max_age_s=10 * 3600, now_ns=T0) == 0
    # older than 7.5 hours: the first two go
    assert store.prune(max_spans=1000, max_age_s=7.5 * 3600, now_ns=T0) == 2
    assert store.count() == (8, 24)
    # over 20 spans: the newest that fit in nine tenths of it (18 spans, 6 traces) stay
    assert store.prune(max_spans=20, max_age_s=10 * 3600, now_ns=T0) == 2
    assert store.count() == (6, 18)
    assert [t.root_name for t in store.traces(TraceQuery(order="start"))] == [
        f"t{i}" for i in range(9, 3, -1)
    ]
    assert store.spans(f"{1:032x}") == []


def test_a_reader_sees_what_the_writer_committed(tmp_path: Path) -> None:
    path = tmp_path / "traces" / "spans.sqlite3"
    assert TraceStore.open_reader(path) is None
    writer = TraceStore.open(path)
    try:
        reader = TraceStore.open_reader(path)
        assert reader is not None
        try:
            assert reader.traces(TraceQuery()) == []
            writer.add(stored(scoring_trace()))
            assert [t.trace_id for t in reader.traces(TraceQuery())] == [TRACE]
            assert len(reader.spans(TRACE)) == 5
        finally:
            reader.close()
    finally:
        writer.close()
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_a_store_from_a_newer_scoremesh_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "spans.sqlite3"
    TraceStore.open(path).close()
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("PRAGMA user_version=99")
    with pytest.raises(FailedPrecondition, match="version 99"):
        TraceStore.open(path)
    with pytest.raises(FailedPrecondition, match="version 99"):
        TraceStore.open_reader(path)


def _count_as_read(path: Path) -> tuple[int, int]:
    """Traces and spans in the store at ``path``, as the CLI reads them."""
    reader = TraceStore.open_reader(path)
    assert reader is not None
    with contextlib.closing(reader):
        return reader.count()


def test_a_store_from_an_older_scoremesh_is_replaced_by_the_writer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spans.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        # version 1's tables, as far as they matter here
        connection.execute("CREATE TABLE spans (trace_id TEXT, span_id TEXT, attributes TEXT)")
        connection.execute("CREATE TABLE traces (trace_id TEXT PRIMARY KEY, services TEXT)")
        connection.execute("INSERT INTO traces VALUES (?, '[]')", (TRACE,))
        connection.execute("PRAGMA user_version=1")
    with pytest.raises(FailedPrecondition, match="older scoremesh"):
        TraceStore.open_reader(path)
    with caplog.at_level("WARNING", logger="services.traces.store"):
        writer = TraceStore.open(path)
    try:
        assert "1 traces dropped" in caplog.text
        assert writer.count() == (0, 0)
        assert writer.add(stored(scoring_trace())) == 5
    finally:
        writer.close()
    assert _count_as_read(path) == (1, 5)


async def test_the_writer_checkpoints_from_a_connection_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "spans.sqlite3"
    wal = path.with_name(path.name + "-wal")
    writer = SpanWriter(path, max_spans=10**6, max_age_s=3600, checkpoint_interval_s=0)
    await writer.start()
    try:
        empty = path.stat().st_size
        for i in range(20):
            await writer.write(
                stored(
                    [
                        span(f"{i + 1:04x}{j + 1:012x}", "", "s", "svc", 0, 1, trace_id=f"{i + 1:032x}")
                        for j in range(50)
                    ]
                )
            )
        # the writer's own commits never copy the WAL into the database (no autocheckpoint):
        # the file grows only through the checkpointing connection, in its own thread
        for _ in range(1000):  # polled for up to 10 s
            if path.stat().st_size > empty:
                break
            await asyncio.sleep(0.01)
        assert path.stat().st_size > empty
        assert wal.exists()
    finally:
        await writer.close()
    assert not wal.exists()  # closed, the last connection copied the rest and removed the WAL
    assert _count_as_read(path) == (20, 1000)


async def test_a_writer_that_fails_to_start_leaves_nothing_open(tmp_path: Path) -> None:
    path = tmp_path / "spans.sqlite3"
    # an age no clock can subtract: the first prune, during start, fails
    writer = SpanWriter(path, max_spans=10, max_age_s=float("inf"))
    with pytest.raises(OverflowError):
        await writer.start()
    assert not path.with_name(path.name + "-wal").exists()  # its connection was closed
    with pytest.raises(Unavailable):
        await writer.write(stored(scoring_trace()))


# rendering

WATERFALL = """\
trace 0af7651916cd43dd8448eb211c80319c  POST /v2/models/{name}/infer
5 spans, 4 services (gateway, registry, scoring, triton), 12.5 ms, error, started 2023-11-14 22:13:20.000+00:00

SPAN                                         SERVICE     START ms      DUR ms  TIMELINE                                    STATUS  ATTRIBUTES
POST /v2/models/{name}/infer                 gateway        0.000      12.500  |########################################|  ok      http.route=/v2/models/{name}/infer http.status_code=504
  inference.GRPCInferenceService/ModelInfer  scoring        1.000      10.500  |   ##################################   |  error   rpc.method=ModelInfer scoremesh.model=iris scoremesh.version=3 error="deadline exceeded after 10 ms"
    SELECT versions                          registry       1.500       0.400  |    ###                                 |  ok      db.statement="SELECT version, sha256, size_bytes FROM…"
    batch                                    scoring        2.000       8.000  |      ##########################        |  ok      scoremesh.backend=triton scoremesh.batch_size=8
      InferRequest                           triton         3.000       6.500  |         ######################         |  ok      triton.model_name=iris_3"""  # noqa: E501


def test_the_waterfall_of_a_known_trace() -> None:
    spans = scoring_trace()
    assert "\n".join(waterfall(list(reversed(spans)), tz=datetime.UTC)) == WATERFALL


TABLE = """\
TRACE ID                          ROOT                          SERVICES                            SPANS  START                      DURATION  STATUS
0af7651916cd43dd8448eb211c80319c  POST /v2/models/{name}/infer  gateway, registry, scoring, triton      5  2023-11-14 22:13:20.000     12.5 ms  error
4bf92f3577b34da6a3ce929d0e0e4736  Register                      training                                1  2023-11-14 22:13:21.000      2.00 s  ok"""  # noqa: E501


def test_the_trace_table(store: TraceStore) -> None:
    store.add(stored(scoring_trace()))
    store.add(
        stored([span("b000000000000001", "", "Register", "scoremesh-training", 1000, 3000, trace_id=OTHER)])
    )
    traces = store.traces(TraceQuery(order="start"))[::-1]
    assert "\n".join(trace_table(traces, tz=datetime.UTC)) == TABLE
    assert summary_json(traces[0]) == {
        "trace_id": TRACE,
        "root_name": "POST /v2/models/{name}/infer",
        "root_service": "scoremesh-gateway",
        "services": ["scoremesh-gateway", "scoremesh-registry", "scoremesh-scoring", "triton"],
        "span_count": 5,
        "error_count": 1,
        "status": "error",
        "start_time": "2023-11-14T22:13:20.000000+00:00",
        "start_time_unix_nano": T0,
        "duration_ms": 12.5,
    }


def test_tree_order_keeps_orphans_and_survives_loops() -> None:
    spans = [
        span("c000000000000001", "", "root", "s", 0, 10),
        span("c000000000000002", "c000000000000001", "child", "s", 2, 3),
        span("c000000000000003", "ffffffffffffffff", "orphan", "s", 1, 2),
        span("c000000000000004", "c000000000000005", "loop a", "s", 4, 5),
        span("c000000000000005", "c000000000000004", "loop b", "s", 5, 6),
        span("c000000000000006", "c000000000000006", "own parent", "s", 6, 7),
        span("c000000000000007", "c000000000000001", "early child", "s", 1, 9),
    ]
    order = [(s.name, depth) for s, depth in tree_order(spans)]
    assert order == [
        ("root", 0),
        ("early child", 1),
        ("child", 1),
        ("orphan", 0),
        ("own parent", 0),
        ("loop a", 0),
        ("loop b", 1),
    ]
    assert waterfall([]) == []
    document = span_json(spans[1], depth=1, trace_start_ns=T0)
    assert (document["offset_ms"], document["duration_ms"], document["kind"]) == (2.0, 1.0, "SERVER")
    assert document["status"] == {"code": "UNSET", "message": ""}


def test_parse_since() -> None:
    assert parse_since("90s") == 90
    assert parse_since("10m") == 600
    assert parse_since("1.5h") == 5400
    assert parse_since("7D") == 7 * 86400
    for bad in ("10", "m", "-1h", "10 minutes"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_since(bad)


# OTLP → records


def _export(*spans: Span, service: str | None = "scoremesh-scoring") -> ExportTraceServiceRequest:
    resource = ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])
    resource.scope_spans[0].scope.name = "services.scoring"
    if service is not None:
        resource.resource.attributes.add(key="service.name", value=AnyValue(string_value=service))
    return ExportTraceServiceRequest(resource_spans=[resource])


def test_protobuf_spans_become_records() -> None:
    proto = Span(
        trace_id=bytes.fromhex(TRACE),
        span_id=bytes.fromhex("00f067aa0ba902b7"),
        parent_span_id=bytes.fromhex("53995c3f42cd8ad8"),
        name="Score",
        kind=Span.SPAN_KIND_SERVER,
        start_time_unix_nano=T0,
        end_time_unix_nano=T0 + 5 * MS,
        status=Status(code=Status.STATUS_CODE_ERROR, message="boom"),
        attributes=[
            KeyValue(key="scoremesh.model", value=AnyValue(string_value="iris")),
            KeyValue(key="scoremesh.batch_size", value=AnyValue(int_value=8)),
            KeyValue(key="ratio", value=AnyValue(double_value=float("nan"))),
            KeyValue(key="ok", value=AnyValue(bool_value=True)),
            KeyValue(key="raw", value=AnyValue(bytes_value=b"\x00\x01")),
            KeyValue(
                key="shape",
                value=AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=1), AnyValue(int_value=4)])),
            ),
            KeyValue(key="empty", value=AnyValue()),
        ],
    )
    proto.events.add(name="exception", time_unix_nano=T0 + MS).attributes.add(
        key="exception.type", value=AnyValue(string_value="ValueError")
    )
    proto.links.add(trace_id=bytes.fromhex(OTHER), span_id=bytes.fromhex("00f067aa0ba902b8"))
    request = request_from_protobuf(_export(proto).SerializeToString())
    decoded = decode_export(request)
    assert decoded.rejected == 0
    [row] = decoded.spans
    # what the listing filters on is read at once; the rest when the trace is shown
    assert (row.service, row.scope, row.status_code, row.model) == (
        "scoremesh-scoring",
        "services.scoring",
        2,
        "iris",
    )
    assert span_record(row) == SpanRecord(
        trace_id=TRACE,
        span_id="00f067aa0ba902b7",
        parent_span_id="53995c3f42cd8ad8",
        name="Score",
        kind=2,
        service="scoremesh-scoring",
        scope="services.scoring",
        start_ns=T0,
        end_ns=T0 + 5 * MS,
        status_code=2,
        status_message="boom",
        attributes={
            "scoremesh.model": "iris",
            "scoremesh.batch_size": 8,
            "ratio": "nan",
            "ok": True,
            "raw": "AAE=",
            "shape": [1, 4],
            "empty": None,
        },
        events=[
            {"name": "exception", "time_unix_nano": T0 + MS, "attributes": {"exception.type": "ValueError"}}
        ],
        links=[{"trace_id": OTHER, "span_id": "00f067aa0ba902b8", "attributes": {}}],
    )
    assert response_for(decoded).ByteSize() == 0  # all taken: an empty response


def test_spans_with_bad_ids_are_rejected_alone() -> None:
    good = Span(trace_id=bytes.fromhex(TRACE), span_id=b"\x01" * 8, name="good")
    bad = [
        Span(trace_id=b"\x01" * 4, span_id=b"\x01" * 8, name="short trace id"),
        Span(trace_id=b"\x00" * 16, span_id=b"\x01" * 8, name="zero trace id"),
        Span(trace_id=b"\x01" * 16, span_id=b"", name="no span id"),
        Span(trace_id=b"\x01" * 16, span_id=b"\x01" * 8, parent_span_id=b"\x01", name="short parent"),
        Span(trace_id=b"\x01" * 16, span_id=b"\x01" * 8, start_time_unix_nano=2**64 - 1, name="far future"),
    ]
    decoded = decode_export(_export(good, *bad, service=None))
    assert [s.name for s in decoded.spans] == ["good"]
    assert decoded.spans[0].service == "unknown_service"
    assert decoded.rejected == 5
    assert "short trace id" in decoded.error_message
    partial = response_for(decoded).partial_success
    assert partial.rejected_spans == 5
    assert partial.error_message == decoded.error_message


def test_otlp_json_with_hex_or_base64_ids() -> None:
    document = {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "triton"}}]},
                "scopeSpans": [
                    {
                        "scope": {"name": "triton-server"},
                        "spans": [
                            {
                                "traceId": TRACE.upper(),
                                "spanId": "00f067aa0ba902b7",
                                "parentSpanId": base64.b64encode(bytes.fromhex("53995c3f42cd8ad8")).decode(),
                                "name": "InferRequest",
                                "kind": "SPAN_KIND_SERVER",
                                "startTimeUnixNano": str(T0),
                                "endTimeUnixNano": T0 + MS,
                                "attributes": [{"key": "triton.model_version", "value": {"intValue": "3"}}],
                                "links": [{"traceId": OTHER, "spanId": "00f067aa0ba902b8"}],
                                "someFutureField": {"x": 1},
                            }
                        ],
                    }
                ],
            }
        ]
    }
    decoded = decode_export(request_from_json(json.dumps(document).encode()))
    [record] = [span_record(row) for row in decoded.spans]
    assert (record.trace_id, record.span_id, record.parent_span_id) == (
        TRACE,
        "00f067aa0ba902b7",
        "53995c3f42cd8ad8",
    )
    assert (record.service, record.scope, record.kind, record.start_ns) == ("triton", "triton-server", 2, T0)
    assert record.attributes == {"triton.model_version": 3}
    assert record.links[0]["trace_id"] == OTHER


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b'{"resourceSpans": 7}',
        b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "not an id!"}]}]}]}',
        b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": 5, "kind": "NO_SUCH_KIND"}]}]}]}',
        b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "\\ud800"}]}]}]}',
        b"\xff\xfe",
        b"[" * 100_000,
    ],
)
def test_bad_json_is_invalid_argument(body: bytes) -> None:
    with pytest.raises(InvalidArgument):
        request_from_json(body)


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xff\xff",
        b"\x0a\x05\x0a\x01",  # a length past the end
        b"\x0a\x07\x12\x05\x12\x03\x2a\x01\xff",  # a span name that is not UTF-8
    ],
)
def test_bad_protobuf_is_invalid_argument(body: bytes) -> None:
    with pytest.raises(InvalidArgument):
        request_from_protobuf(body)
