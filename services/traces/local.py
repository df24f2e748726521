"""Where the services ``scoremesh up`` starts send their spans.

Tracing follows the standard ``OTEL_*`` variables, so the choice is made here once:

* ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``: tracing is off; nothing starts.
* ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set: every
  service, and Triton, exports there as the variables say; no receiver starts.
* otherwise: a local :class:`OtlpReceiver` starts, in the ``up`` process, and every service
  gets ``OTEL_EXPORTER_OTLP_ENDPOINT`` and ``OTEL_EXPORTER_OTLP_PROTOCOL`` pointing at it:
  OTLP/HTTP (``http/protobuf``), the one protocol Triton speaks too, so the one endpoint
  serves the whole mesh; OTLP/gRPC when the user's ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``
  asks for ``grpc``.

Each service also gets its own ``OTEL_SERVICE_NAME`` (:func:`otel_service_name`), whatever
the user set: one name for five services would make their traces unreadable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from services.mesh.settings import MeshSettings
from services.traces.model import SERVICE_PREFIX
from services.traces.receiver import TRACES_PATH, OtlpReceiver
from services.traces.settings import TracesSettings

__all__ = ["TraceExport", "otel_service_name", "start_trace_export"]

_ENDPOINTS: Final = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_PROTOCOLS: Final = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")


@dataclass
class TraceExport:
    """What ``scoremesh up`` tells its services about tracing, and the receiver it runs."""

    environment: Mapping[str, str] = field(default_factory=dict)
    """``OTEL_*`` variables for every service (empty: the user's own stand)."""
    summary: str = ""
    """One line for the banner."""
    receiver: OtlpReceiver | None = None

    async def close(self) -> None:
        """Stops the receiver, if one runs, after committing what it received."""
        if self.receiver is not None:
            await self.receiver.stop()


def otel_service_name(service: str) -> str:
    """The ``OTEL_SERVICE_NAME`` ``scoremesh up`` gives a service: ``scoremesh-registry``,
    ``scoremesh-training-worker``, …"""
    return SERVICE_PREFIX + service


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return name, value
    return None


async def start_trace_export(mesh: MeshSettings, env: Mapping[str, str]) -> TraceExport:
    """Decides where spans go (see the module's description) and starts the local receiver
    when they go to it."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return TraceExport(summary="off (OTEL_SDK_DISABLED=true)")
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return TraceExport(summary="off (OTEL_TRACES_EXPORTER=none)")
    configured = _first(env, _ENDPOINTS)
    if configured is not None:
        name, endpoint = configured
        return TraceExport(summary=f"exported to {endpoint} ({name})")
    settings = TracesSettings.from_env(mesh.home, env)
    receiver = OtlpReceiver(settings, mesh)
    await receiver.start()
    protocol = _first(env, _PROTOCOLS)
    if protocol is not None and protocol[1] == "grpc":
        environment = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.grpc_address}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        }
    else:
        environment = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.http_address}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        }
    summary = (
        f"OTLP/HTTP http://{receiver.http_address}{TRACES_PATH}, OTLP/gRPC {receiver.grpc_address}"
        f" → {settings.directory} (scoremesh traces)"
    )
    return TraceExport(environment, summary, receiver)
