"""The training service's and its workers' composition roots: settings → pools, stores,
plugins, service, servicer, server; or → the worker loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc.aio
from scoremesh.training.v1 import training_pb2_grpc

from services.mesh import metrics
from services.mesh.artifacts import LocalArtifactStore
from services.mesh.channels import open_channel
from services.mesh.metrics import serve_metrics
from services.mesh.notify import EventListener
from services.mesh.postgres import database
from services.mesh.server import MeshServer, Registration, address_file, announce, health_only_server, serve
from services.mesh.telemetry import configure_logging, setup_tracing
from services.training import datasets_io
from services.training.datasets import DatasetStore
from services.training.jobs import JobState, JobStore
from services.training.plugins import discover_plugins
from services.training.service import TrainingService
from services.training.servicer import SERVICE_NAME, TrainingServicer
from services.training.settings import TrainingSettings
from services.training.worker import Worker

log = logging.getLogger(__name__)

QUEUE_COUNT_INTERVAL_S = 5.0


def dataset_store(settings: TrainingSettings, jobs: JobStore) -> tuple[DatasetStore, LocalArtifactStore]:
    files = LocalArtifactStore(settings.store_dir / "files")
    store = DatasetStore(jobs.pool, files, datasets_io.inspect, max_bytes=settings.max_dataset_bytes)
    return store, files


@dataclass
class Training:
    """A built training service: its server (not yet started) and what it owns."""

    server: MeshServer
    service: TrainingService
    jobs: JobStore
    events: EventListener

    async def close(self) -> None:
        await self.events.stop()
        await self.jobs.close()


async def build_training(
    settings: TrainingSettings, database_url: str, scoring: grpc.aio.Channel | None = None
) -> Training:
    jobs = await JobStore.open(database_url)
    datasets, files = dataset_store(settings, jobs)
    files.sweep_abandoned_uploads()
    events = JobStore.events_listener(database_url)
    await events.start()
    plugins = {name: plugin.info for name, plugin in discover_plugins(settings.plugins_dir).items()}
    service = TrainingService(
        jobs,
        datasets,
        plugins,
        events,
        scoring,
        max_attempts=settings.max_attempts,
        time_limit_s=settings.time_limit_s,
        call_timeout_s=settings.mesh.default_deadline_s,
    )
    server = MeshServer(
        "training",
        [
            Registration(
                SERVICE_NAME, training_pb2_grpc.add_TrainingServicer_to_server, TrainingServicer(service)
            )
        ],
        settings.mesh,
        host=settings.host,
        port=settings.port,
    )
    return Training(server, service, jobs, events)


async def run(settings: TrainingSettings) -> None:
    async with (
        database(settings.database_url, settings.mesh.home) as database_url,
        open_channel(settings.scoring_addr, settings.mesh) as scoring,
    ):
        training = await build_training(settings, database_url, scoring)
        counting = asyncio.create_task(_count_jobs(training.jobs), name="count-jobs")

        async def stop_counting() -> None:
            counting.cancel()

        await serve(training.server, cleanup=[stop_counting, training.close])


async def _count_jobs(jobs: JobStore) -> None:
    """Keeps the queue-depth gauge current (a scrape cannot wait on PostgreSQL)."""
    while True:
        try:
            counts = await jobs.counts()
        except Exception as error:
            log.warning("counting jobs failed: %s", error)
        else:
            for state in JobState:
                metrics.TRAINING_QUEUE.labels(state.value).set(counts.get(state, 0))
        await asyncio.sleep(QUEUE_COUNT_INTERVAL_S)


@contextlib.asynccontextmanager
async def built_worker(settings: TrainingSettings, database_url: str) -> AsyncIterator[Worker]:
    """A worker with its stores, queue listener and registry channel, closed on exit."""
    jobs = await JobStore.open(database_url, max_size=2 + settings.worker_concurrency)
    queue = JobStore.queue_listener(database_url)
    await queue.start()
    try:
        async with open_channel(settings.registry_addr, settings.mesh) as registry:
            datasets, files = dataset_store(settings, jobs)
            yield Worker(
                jobs,
                datasets,
                files,
                queue,
                registry,
                concurrency=settings.worker_concurrency,
                lease_s=settings.lease_s,
                memory_bytes=settings.memory_bytes,
                plugins_dir=settings.plugins_dir,
                work_dir=settings.store_dir / "work",
            )
    finally:
        await queue.stop()
        await jobs.close()


async def run_worker(settings: TrainingSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with (
        database(settings.database_url, settings.mesh.home) as database_url,
        built_worker(settings, database_url) as worker,
    ):
        exporter = serve_metrics(settings.host, settings.mesh.metrics_port)
        announced = [announce(address_file(settings.mesh.home, "training-worker-metrics"), exporter.address)]
        health = health_only_server("training-worker", settings.mesh, settings.host)
        try:
            if health is not None:
                await health.start()
                announced.append(
                    announce(address_file(settings.mesh.home, "training-worker-health"), health.address)
                )
            await worker.run(stop)
        finally:
            if health is not None:
                await health.stop(0)  # NOT_SERVING first, then closed: the worker is going
            for path in announced:
                path.unlink(missing_ok=True)
            exporter.close()


def main() -> None:
    settings = TrainingSettings.from_env()
    configure_logging(settings.mesh.log_level, settings.mesh.log_format)
    flush_traces = setup_tracing("scoremesh-training")
    try:
        asyncio.run(run(settings))
    finally:
        flush_traces()


def worker_main() -> None:
    settings = TrainingSettings.from_env()
    configure_logging(settings.mesh.log_level, settings.mesh.log_format)
    flush_traces = setup_tracing("scoremesh-training-worker")
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_worker(settings))
    finally:
        flush_traces()
