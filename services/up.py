"""``scoremesh up``: the whole mesh in the foreground on one machine.

PostgreSQL (the configured one, or a private cluster under SCOREMESH_HOME) and each service
as a supervised child process; Ctrl-C (or SIGTERM) stops them all in reverse order. Spans go
to a local OTLP receiver run in this process, unless the OTEL_* variables send them elsewhere
(services.traces.local).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from services.mesh.postgres import EmbeddedPostgres, resolve_database_url
from services.mesh.server import address_file
from services.mesh.settings import INTERNAL_TOKEN_FILE, MeshSettings
from services.mesh.supervisor import ProcessSpec, Supervisor
from services.mesh.telemetry import configure_logging
from services.registry.servicer import SERVICE_NAME as REGISTRY_SERVICE
from services.scoring.oip import SERVICE_NAME as INFERENCE_SERVICE
from services.traces.local import TraceExport, otel_service_name, start_trace_export
from services.training.servicer import SERVICE_NAME as TRAINING_SERVICE

log = logging.getLogger("scoremesh.up")

READY_TIMEOUT_S = 120.0


def _service(name: str, mesh: MeshSettings, health_service: str, env: dict[str, str]) -> ProcessSpec:
    return ProcessSpec(
        name=name,
        argv=[sys.executable, "-m", "services.cli", "serve", name],
        address_file=address_file(mesh.home, name),
        health_service=health_service,
        env={**env, "OTEL_SERVICE_NAME": otel_service_name(name)},
    )


def ensure_internal_token(mesh: MeshSettings) -> str:
    """The mesh's internal token: the configured one, or a new one written (mode 0600) to
    ``$SCOREMESH_HOME/internal.token``, where the CLI finds it."""
    if mesh.internal_token:
        return mesh.internal_token
    token = secrets.token_urlsafe(32)
    mesh.home.mkdir(parents=True, exist_ok=True)
    path = mesh.home / INTERNAL_TOKEN_FILE
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    partial.replace(path)
    return token


def _service_stages(
    mesh: MeshSettings, database_url: str, token: str, traces: TraceExport
) -> list[Callable[[dict[str, str]], ProcessSpec]]:
    """The services in start order; each stage is built from the addresses of those before
    it (``{name: host:port}``), so any of them may listen on port 0."""
    shared = {
        "SCOREMESH_DATABASE_URL": database_url,
        "SCOREMESH_INTERNAL_TOKEN": token,
        **traces.environment,
    }
    return [
        lambda _: _service("registry", mesh, REGISTRY_SERVICE, shared),
        lambda up: _service(
            "scoring", mesh, INFERENCE_SERVICE, {**shared, "SCOREMESH_REGISTRY_ADDR": up["registry"]}
        ),
        lambda up: _service(
            "training",
            mesh,
            TRAINING_SERVICE,
            {**shared, "SCOREMESH_REGISTRY_ADDR": up["registry"], "SCOREMESH_SCORING_ADDR": up["scoring"]},
        ),
        lambda up: dataclasses.replace(
            _service("training-worker", mesh, "", {**shared, "SCOREMESH_REGISTRY_ADDR": up["registry"]}),
            address_file=None,
        ),
        lambda up: dataclasses.replace(
            _service(
                "gateway",
                mesh,
                "",
                {
                    **shared,
                    "SCOREMESH_REGISTRY_ADDR": up["registry"],
                    "SCOREMESH_SCORING_ADDR": up["scoring"],
                    "SCOREMESH_TRAINING_ADDR": up["training"],
                },
            ),
            http_health_path="/healthz",
        ),
    ]


async def run_up() -> int:
    started = time.monotonic()
    mesh = MeshSettings.from_env()
    configure_logging(mesh.log_level, "text")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    cluster: EmbeddedPostgres | None = None
    database_url = resolve_database_url(os.environ)
    if database_url is None:
        cluster = EmbeddedPostgres(mesh.home / "postgres")
        database_url = await asyncio.to_thread(cluster.start)
    supervisor = Supervisor(stop_timeout_s=mesh.shutdown_grace_s + 5, tls=mesh.tls)
    traces = TraceExport()
    try:
        # first in, last out: the services' final spans, flushed as they stop, still land
        traces = await start_trace_export(mesh, os.environ)
        addresses: dict[str, str] = {}
        for stage in _service_stages(mesh, database_url, ensure_internal_token(mesh), traces):
            spec = stage(addresses)
            await supervisor.start(spec)
            ready: asyncio.Future[str] = asyncio.ensure_future(supervisor.wait_healthy(spec, READY_TIMEOUT_S))
            stopped: asyncio.Future[bool] = asyncio.ensure_future(stop.wait())
            either: set[asyncio.Future[Any]] = {ready, stopped}
            done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if stopped in done:
                ready.cancel()
                return 130
            stopped.cancel()
            addresses[spec.name] = await ready
        print(f"scoremesh is up in {time.monotonic() - started:.2f} s", flush=True)
        print(
            "  postgres  " + (f"private cluster under {mesh.home / 'postgres'}" if cluster else "configured")
        )
        for name, address in addresses.items():
            if not address:
                print(f"  {name}")
                continue
            kind = "HTTP, http://" + address if name == "gateway" else "gRPC"
            print(f"  {name:<9} {address} ({kind})")
        admin = address_file(mesh.home, "gateway-admin")
        if admin.exists():
            print(f"  {'admin':<9} {admin.read_text().strip()} (gRPC: scoremesh keys, scoremesh usage)")
        print(f"  admin key in {mesh.home / 'admin.key'}")
        print(f"  {'traces':<9} {traces.summary}")
        print("Ctrl-C stops everything.", flush=True)
        await stop.wait()
        print("stopping…", flush=True)
        return 0
    finally:
        await supervisor.stop_all()
        await traces.close()
        if cluster is not None:
            await asyncio.to_thread(cluster.stop)
