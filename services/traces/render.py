"""What ``scoremesh traces`` prints: the trace table, the waterfall of one trace, and both as
JSON. Pure functions of the records (and a time zone), so that a known trace renders to a
known text."""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Sequence
from typing import Any, Final

from services.traces.model import (
    KEY_ATTRIBUTES,
    SERVICE_PREFIX,
    AttributeValue,
    SpanKind,
    SpanRecord,
    SpanStatus,
    TraceSummary,
)

__all__ = [
    "BAR_WIDTH",
    "span_json",
    "summary_json",
    "trace_table",
    "tree_order",
    "waterfall",
]

BAR_WIDTH: Final = 40
"""Columns of the waterfall's timeline: the whole trace, start to end."""
_NAME_WIDTH: Final = 48
_ROOT_WIDTH: Final = 40
_STATEMENT_CHARS: Final = 40
_MESSAGE_CHARS: Final = 60
_STATEMENT_KEYS: Final = frozenset({"db.statement", "db.query.text"})
_PLAIN: Final = re.compile(r"[^\s\"'=]+")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _short_service(service: str) -> str:
    return service.removeprefix(SERVICE_PREFIX) or service


def _local_time(ns: int, tz: datetime.tzinfo | None) -> datetime.datetime:
    moment = datetime.datetime.fromtimestamp(ns // 10**9, datetime.UTC).replace(
        microsecond=ns % 10**9 // 1000
    )
    return moment.astimezone(tz)


def _iso(ns: int) -> str:
    return _local_time(ns, datetime.UTC).isoformat(timespec="microseconds")


def _duration(ns: int) -> str:
    if ns < 10**9:
        return f"{ns / 1e6:.1f} ms"
    return f"{ns / 1e9:.2f} s"


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


def _status(failed: bool) -> str:
    return "error" if failed else "ok"


# the trace table


def trace_table(traces: Sequence[TraceSummary], *, tz: datetime.tzinfo | None = None) -> list[str]:
    """One line per trace under a header: id, root span, services (without ``scoremesh-``),
    span count, start time (in ``tz``, default local), duration and status."""
    root_width = max([4, *(min(len(t.root_name), _ROOT_WIDTH) for t in traces)])
    services = [", ".join(_short_service(s) for s in t.services) for t in traces]
    services_width = max([8, *(len(s) for s in services)])
    lines = [
        f"{'TRACE ID':<32}  {'ROOT':<{root_width}}  {'SERVICES':<{services_width}}  {'SPANS':>5}"
        f"  {'START':<23}  {'DURATION':>10}  STATUS"
    ]
    for summary, names in zip(traces, services, strict=True):
        start = _local_time(summary.start_ns, tz).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        lines.append(
            f"{summary.trace_id:<32}  {_clip(summary.root_name, root_width):<{root_width}}"
            f"  {names:<{services_width}}  {summary.span_count:>5}  {start:<23}"
            f"  {_duration(summary.duration_ns):>10}  {_status(summary.failed)}"
        )
    return lines


def summary_json(summary: TraceSummary) -> dict[str, Any]:
    return {
        "trace_id": summary.trace_id,
        "root_name": summary.root_name,
        "root_service": summary.root_service,
        "services": list(summary.services),
        "span_count": summary.span_count,
        "error_count": summary.error_count,
        "status": _status(summary.failed),
        "start_time": _iso(summary.start_ns),
        "start_time_unix_nano": summary.start_ns,
        "duration_ms": _ms(summary.duration_ns),
    }


# one trace


def tree_order(spans: Sequence[SpanRecord]) -> list[tuple[SpanRecord, int]]:
    """Every span with its depth, each parent followed by its children, siblings by start
    time. A span whose parent is not among ``spans`` counts as a root; none is lost, even
    from ids that loop."""
    ordered = sorted(spans, key=lambda s: (s.start_ns, s.span_id))
    present = {s.span_id for s in ordered}
    children: dict[str, list[SpanRecord]] = {}
    roots: list[SpanRecord] = []
    for span in ordered:
        parent = span.parent_span_id
        if parent and parent != span.span_id and parent in present:
            children.setdefault(parent, []).append(span)
        else:
            roots.append(span)
    result: list[tuple[SpanRecord, int]] = []
    seen: set[str] = set()
    # roots first; then whatever a loop of parent ids kept out of every tree
    for start in [*roots, *ordered]:
        stack = [(start, 0)]
        while stack:
            span, depth = stack.pop()
            if span.span_id in seen:
                continue
            seen.add(span.span_id)
            result.append((span, depth))
            stack.extend((child, depth + 1) for child in reversed(children.get(span.span_id, [])))
    return result


def _bar(offset_ns: int, duration_ns: int, total_ns: int, width: int) -> str:
    start = min(offset_ns * width // total_ns, width - 1)
    end = -(-(offset_ns + duration_ns) * width // total_ns)  # rounded up
    end = min(max(end, start + 1), width)
    return " " * start + "#" * (end - start) + " " * (width - end)


def _show(key: str, value: AttributeValue) -> str:
    if isinstance(value, str):
        text = value
        if key in _STATEMENT_KEYS:
            text = _clip(" ".join(value.split()), _STATEMENT_CHARS)
        return text if _PLAIN.fullmatch(text) else json.dumps(text, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _key_attributes(span: SpanRecord) -> str:
    shown = [f"{key}={_show(key, span.attributes[key])}" for key in KEY_ATTRIBUTES if key in span.attributes]
    if span.failed and span.status_message:
        shown.append(f"error={_show('', _clip(span.status_message, _MESSAGE_CHARS))}")
    return " ".join(shown)


def waterfall(
    spans: Sequence[SpanRecord], *, tz: datetime.tzinfo | None = None, width: int = BAR_WIDTH
) -> list[str]:
    """A header naming the trace, then one line per span in :func:`tree_order`: its name
    indented under its parent, service, start offset from the trace's start and duration in
    ms, a bar drawn to scale over ``width`` columns, status and :data:`KEY_ATTRIBUTES`."""
    if not spans:
        return []
    rows = tree_order(spans)
    start_ns = min(s.start_ns for s in spans)
    end_ns = max(s.end_ns for s in spans)
    total_ns = max(end_ns - start_ns, 1)
    root = rows[0][0]
    services = sorted({s.service for s in spans})
    failed = any(s.failed for s in spans)
    names = [_clip("  " * depth + span.name, _NAME_WIDTH) for span, depth in rows]
    name_width = max(4, *(len(n) for n in names))
    service_width = max(7, *(len(_short_service(s)) for s in services))
    started = _local_time(start_ns, tz).isoformat(sep=" ", timespec="milliseconds")
    lines = [
        f"trace {root.trace_id}  {root.name}",
        f"{len(spans)} spans, {len(services)} services ({', '.join(_short_service(s) for s in services)}),"
        f" {_duration(end_ns - start_ns)}, {_status(failed)}, started {started}",
        "",
        f"{'SPAN':<{name_width}}  {'SERVICE':<{service_width}}  {'START ms':>10}  {'DUR ms':>10}"
        f"  {'TIMELINE':<{width + 2}}  STATUS  ATTRIBUTES",
    ]
    for (span, _), name in zip(rows, names, strict=True):
        offset = max(0, span.start_ns - start_ns)
        line = (
            f"{name:<{name_width}}  {_short_service(span.service):<{service_width}}"
            f"  {offset / 1e6:>10.3f}  {span.duration_ns / 1e6:>10.3f}"
            f"  |{_bar(offset, span.duration_ns, total_ns, width)}|  {_status(span.failed):<6}"
            f"  {_key_attributes(span)}"
        )
        lines.append(line.rstrip())
    return lines


def _kind(kind: int) -> str | int:
    try:
        return SpanKind(kind).name
    except ValueError:
        return kind


def _status_name(code: int) -> str | int:
    try:
        return SpanStatus(code).name
    except ValueError:
        return code


def span_json(span: SpanRecord, *, depth: int, trace_start_ns: int) -> dict[str, Any]:
    """A span as ``scoremesh traces ID --json`` prints it."""
    return {
        "trace_id": span.trace_id,
        "span_id": span.span_id,
        "parent_span_id": span.parent_span_id,
        "depth": depth,
        "name": span.name,
        "kind": _kind(span.kind),
        "service": span.service,
        "scope": span.scope,
        "start_time": _iso(span.start_ns),
        "start_time_unix_nano": span.start_ns,
        "end_time_unix_nano": span.end_ns,
        "offset_ms": _ms(span.start_ns - trace_start_ns),
        "duration_ms": _ms(span.duration_ns),
        "status": {"code": _status_name(span.status_code), "message": span.status_message},
        "attributes": dict(span.attributes),
        "events": list(span.events),
        "links": list(span.links),
    }
