"""The registry's composition root: settings → pools, stores, service, servicer, server."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from scoremesh.registry.v1 import registry_pb2_grpc

from services.mesh.artifacts import LocalArtifactStore
from services.mesh.notify import EventListener
from services.mesh.postgres import database
from services.mesh.server import MeshServer, Registration, serve
from services.mesh.telemetry import configure_logging, setup_tracing
from services.registry.service import RegistryService
from services.registry.servicer import SERVICE_NAME, RegistryServicer
from services.registry.settings import RegistrySettings
from services.registry.store import RegistryStore, event_listener

log = logging.getLogger(__name__)


@dataclass
class Registry:
    """A built registry: its server (not yet started) and what it owns."""

    server: MeshServer
    service: RegistryService
    store: RegistryStore
    events: EventListener
    io_executor: ThreadPoolExecutor
    verify_executor: ThreadPoolExecutor

    async def close(self) -> None:
        """Releases what the server used; call after the server stopped."""
        await self.events.stop()
        await self.store.close()
        self.io_executor.shutdown(wait=False, cancel_futures=True)
        self.verify_executor.shutdown(wait=False, cancel_futures=True)


async def build_registry(settings: RegistrySettings, database_url: str) -> Registry:
    store = await RegistryStore.open(database_url)
    io_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="registry-io")
    # each verification runs in a child process; this bounds how many run at once
    verify_executor = ThreadPoolExecutor(
        max_workers=settings.verify_concurrency, thread_name_prefix="registry-verify"
    )
    artifacts = LocalArtifactStore(settings.mesh.home / "artifacts", io_executor)
    artifacts.sweep_abandoned_uploads()
    events = event_listener(database_url)
    await events.start()
    service = RegistryService(
        store,
        artifacts,
        events,
        max_upload_bytes=settings.max_upload_bytes,
        limits=settings.limits,
        executor=verify_executor,
    )
    server = MeshServer(
        "registry",
        [
            Registration(
                SERVICE_NAME, registry_pb2_grpc.add_ModelRegistryServicer_to_server, RegistryServicer(service)
            )
        ],
        settings.mesh,
        host=settings.host,
        port=settings.port,
    )
    return Registry(server, service, store, events, io_executor, verify_executor)


async def run(settings: RegistrySettings) -> None:
    async with database(settings.database_url, settings.mesh.home) as database_url:
        registry = await build_registry(settings, database_url)
        await serve(registry.server, cleanup=[registry.close])


def main() -> None:
    settings = RegistrySettings.from_env()
    configure_logging(settings.mesh.log_level, settings.mesh.log_format)
    flush_traces = setup_tracing("scoremesh-registry")
    try:
        asyncio.run(run(settings))
    finally:
        flush_traces()
