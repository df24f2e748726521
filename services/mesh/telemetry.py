"""Logging and tracing set-up, done once by each service's ``main``.

Library code only ever uses ``logging.getLogger(__name__)`` and the OpenTelemetry API; this
module is where what stands behind the API is chosen: the mesh's lean tracer provider
(spans.py, exporting with otlp.py). Tracing follows the standard ``OTEL_*`` variables alone:
without ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or its ``_TRACES_`` twin) nothing is installed, and
every span the kernel opens is the API's non-recording one, which costs almost nothing while
still passing a caller's W3C trace context on to the next hop.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, Final

from opentelemetry import trace

from services.mesh.settings import SettingsError

__all__ = [
    "REQUEST_ID",
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "setup_tracing",
]

log = logging.getLogger(__name__)

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("scoremesh_request_id", default=None)
"""The id of the call being served, set by the server interceptor; logged with every line."""

# attributes every LogRecord has; anything else on a record came from ``extra=`` and is logged
_RECORD_FIELDS: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime", "taskName"}
)
_HANDLER_MARK: Final = "_scoremesh_handler"


def _trace_ids() -> tuple[str, str] | None:
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the current
    trace_id/span_id and request_id when there are any, ``extra=`` fields, and the traceback
    as ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ids = _trace_ids()
        if ids is not None:
            entry["trace_id"], entry["span_id"] = ids
        request_id = REQUEST_ID.get()
        if request_id is not None:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level logger: message [request_id trace_id]`` for people at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        tags = []
        request_id = REQUEST_ID.get()
        if request_id is not None:
            tags.append(f"request={request_id}")
        ids = _trace_ids()
        if ids is not None:
            tags.append(f"trace={ids[0]}")
        if not tags:
            return line
        first, newline, rest = line.partition("\n")
        return f"{first} [{' '.join(tags)}]{newline}{rest}"


def configure_logging(level: str, fmt: str) -> None:
    """Sends every log record at ``level`` or above to stderr as JSON lines (``fmt="json"``) or
    text (``"text"``). Calling it again replaces what an earlier call installed and leaves
    other handlers alone."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
    elif fmt == "text":
        formatter = TextFormatter()
    else:
        raise ValueError(f"unknown log format {fmt!r}: expected json or text")
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, _HANDLER_MARK, False):
            root.removeHandler(existing)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(numeric)


def _nothing() -> None:
    return None


def _first(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


def setup_tracing(default_service_name: str, env: Mapping[str, str] | None = None) -> Callable[[], None]:
    """Installs the mesh's lean tracer provider (spans.py) when the standard variables ask
    for an exporter, and returns the function that flushes and shuts it down (call it last,
    after the server and its resources stopped). Nothing is installed, and the returned
    function does nothing, when ``OTEL_SDK_DISABLED=true``, ``OTEL_TRACES_EXPORTER=none``, or
    no OTLP endpoint is set.

    ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` picks ``http/protobuf`` (the default, as the
    specification says) or ``grpc``; endpoint, headers, timeout, compression and certificates
    come from their standard variables (otlp.py). ``OTEL_SERVICE_NAME`` (or ``service.name``
    in ``OTEL_RESOURCE_ATTRIBUTES``) overrides ``default_service_name``. The sampler comes
    from ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` (parent-based, always on, by
    default), span limits from ``OTEL_SPAN_*_LIMIT`` and the export batching from
    ``OTEL_BSP_*``. A bad value raises SettingsError naming the variable.
    """
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return _nothing
    exporter_name = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter_name == "none":
        return _nothing
    if exporter_name != "otlp":
        raise SettingsError(f"OTEL_TRACES_EXPORTER={exporter_name!r}: only otlp and none are supported")
    if _first(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT") is None:
        return _nothing

    from services import version
    from services.mesh.otlp import ExportSettings, OtlpExporter
    from services.mesh.spans import LeanTracerProvider, QueueSettings, Sampler, SpanLimits, resource_from_env

    resource = resource_from_env(env, default_service_name, version())
    export = ExportSettings.from_env(env)
    provider = LeanTracerProvider(
        OtlpExporter(export, resource),
        sampler=Sampler.from_env(env),
        limits=SpanLimits.from_env(env),
        queue=QueueSettings.from_env(env),
    )
    trace.set_tracer_provider(provider)
    log.info("tracing to OTLP (%s, %s) as %s", export.protocol, export.endpoint, resource["service.name"])

    done = False

    def shutdown() -> None:
        nonlocal done
        if not done:
            done = True
            provider.shutdown()

    return shutdown
