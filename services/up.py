"""``scoremesh up``: the whole mesh in the foreground on one machine.

PostgreSQL (the configured one, or a private cluster under SCOREMESH_HOME) and each service
as a supervised child process; Ctrl-C (or SIGTERM) stops them all in reverse order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any

from services.mesh.postgres import EmbeddedPostgres, resolve_database_url
from services.mesh.server import address_file
from services.mesh.settings import MeshSettings
from services.mesh.supervisor import ProcessSpec, Supervisor
from services.mesh.telemetry import configure_logging
from services.registry.servicer import SERVICE_NAME as REGISTRY_SERVICE

log = logging.getLogger("scoremesh.up")

READY_TIMEOUT_S = 120.0


def _service_specs(mesh: MeshSettings, database_url: str) -> list[ProcessSpec]:
    return [
        ProcessSpec(
            name="registry",
            argv=[sys.executable, "-m", "services.cli", "serve", "registry"],
            address_file=address_file(mesh.home, "registry"),
            health_service=REGISTRY_SERVICE,
            env={"SCOREMESH_DATABASE_URL": database_url},
        )
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
    supervisor = Supervisor(stop_timeout_s=mesh.shutdown_grace_s + 5)
    try:
        specs = _service_specs(mesh, database_url)
        for spec in specs:
            await supervisor.start(spec)
        waiting: asyncio.Future[list[str]] = asyncio.gather(
            *(supervisor.wait_healthy(spec, READY_TIMEOUT_S) for spec in specs)
        )
        stopped: asyncio.Future[bool] = asyncio.ensure_future(stop.wait())
        either: set[asyncio.Future[Any]] = {waiting, stopped}
        done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if stopped in done:
            waiting.cancel()
            return 130
        stopped.cancel()
        addresses = await waiting
        print(f"scoremesh is up in {time.monotonic() - started:.2f} s", flush=True)
        print(
            "  postgres  " + (f"private cluster under {mesh.home / 'postgres'}" if cluster else "configured")
        )
        for spec, address in zip(specs, addresses, strict=True):
            print(f"  {spec.name:<9} {address} (gRPC)")
        print("Ctrl-C stops everything.", flush=True)
        await stop.wait()
        print("stopping…", flush=True)
        return 0
    finally:
        await supervisor.stop_all()
        if cluster is not None:
            await asyncio.to_thread(cluster.stop)
