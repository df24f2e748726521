"""The scoring service's composition root: settings → backends (a local Triton when none is
configured), router, batcher, cache, prediction log → service, servicers, server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from scoremesh.scoring.v1 import scoring_pb2_grpc

from services.mesh import metrics
from services.mesh.channels import open_channel
from services.mesh.identity import Caller
from services.mesh.postgres import database
from services.mesh.server import MeshServer, Registration, serve
from services.mesh.telemetry import configure_logging, setup_tracing
from services.registry.client import RegistryClient
from services.registry.servicer import SERVICE_NAME as REGISTRY_SERVICE
from services.scoring import metrics as scoring_metrics
from services.scoring.backend import Backend
from services.scoring.backends import BackendSet
from services.scoring.batcher import Batcher
from services.scoring.breaker import CircuitBreaker
from services.scoring.cache import ResponseCache
from services.scoring.feedback_servicer import SERVICE_NAME as FEEDBACK_SERVICE
from services.scoring.feedback_servicer import ScoringServicer
from services.scoring.oip import SERVICE_NAME as INFERENCE_SERVICE
from services.scoring.oip import pb_grpc
from services.scoring.onnxruntime_backend import OnnxRuntimeBackend
from services.scoring.predictions import PredictionLog, PredictionStore
from services.scoring.router import ModelRouter
from services.scoring.service import ScoringLimits, ScoringService
from services.scoring.servicer import InferenceServicer
from services.scoring.settings import ScoringSettings
from services.scoring.triton_backend import TritonBackend
from services.scoring.triton_config import TritonBackendKind
from services.scoring.triton_server import (
    RESTRICTED_HEADER_PREFIX,
    LocalTriton,
    gpu_available,
    trace_args_from_env,
)

log = logging.getLogger(__name__)


@dataclass
class Scoring:
    """A built scoring service: its server (not yet started) and what it owns, closed in
    reverse order of construction by :meth:`close`."""

    server: MeshServer
    service: ScoringService
    router: ModelRouter
    backends: BackendSet
    batcher: Batcher
    local_triton: LocalTriton | None
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def close(self) -> None:
        for close in reversed(self.closers):
            try:
                await close()
            except Exception:
                log.exception("closing the scoring service: %s failed", close)


async def build_scoring(settings: ScoringSettings, database_url: str) -> Scoring:
    closers: list[Callable[[], Awaitable[None]]] = []
    try:
        return await _build(settings, database_url, closers)
    except BaseException:
        for close in reversed(closers):
            with contextlib.suppress(Exception):
                await close()
        raise


async def _build(
    settings: ScoringSettings, database_url: str, closers: list[Callable[[], Awaitable[None]]]
) -> Scoring:
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="scoring-ort")
    closers.append(_shutdown_executor(executor))
    onnxruntime = OnnxRuntimeBackend(max_bytes=settings.session_cache_bytes, executor=executor)
    closers.append(onnxruntime.close)

    local_triton: LocalTriton | None = None
    primary: Backend = onnxruntime
    breaker: CircuitBreaker | None = None
    if settings.backend == "triton":
        gpu = gpu_available() if settings.gpu is None else settings.gpu
        # a remote Triton is part of the mesh and speaks its TLS; the local one listens on
        # loopback only, as this service's child
        tls = settings.mesh.tls if settings.triton_url else None
        if settings.triton_url:
            url = settings.triton_url
            headers = (
                {RESTRICTED_HEADER_PREFIX + settings.triton_repository_key: settings.triton_repository_secret}
                if settings.triton_repository_secret
                else {}
            )
        else:
            local_triton = LocalTriton(
                settings.mesh.home / "triton", trace_args=trace_args_from_env(os.environ)
            )
            await local_triton.start()
            closers.append(local_triton.stop)
            url, headers = local_triton.url, local_triton.admin_headers
        kind = (
            None
            if settings.triton_model_backend == "auto"
            else TritonBackendKind(settings.triton_model_backend)
        )
        triton = TritonBackend(
            url,
            max_message_bytes=settings.mesh.max_message_bytes,
            admin_headers=headers,
            gpu=gpu,
            kind=kind,
            tls=tls,
        )
        closers.append(triton.close)
        if local_triton is not None:
            local_triton.on_restart = triton.reload_all
        primary = triton
        breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_open_s, name="triton")
    backends = BackendSet(primary, onnxruntime, settings.fallback == "onnxruntime", breaker)

    channel = open_channel(settings.registry_addr, settings.mesh, retry_services=[REGISTRY_SERVICE])
    closers.append(lambda: channel.close(None))

    def registry(caller: Caller) -> RegistryClient:
        return RegistryClient(channel, caller)

    router = ModelRouter(registry, backends, settings.max_batch_size, ttl_s=settings.resolve_ttl_s)
    closers.append(router.close)
    batcher = Batcher(
        max_batch_rows=settings.max_batch_size,
        max_queue_delay_s=settings.max_queue_delay_s,
        max_concurrent_batches=settings.max_concurrent_batches,
        timeout_cap_s=settings.mesh.default_deadline_s,
    )
    closers.append(batcher.close)

    store = await PredictionStore.open(database_url)
    closers.append(store.close)
    prediction_log = PredictionLog(store, rate=settings.prediction_log_rate)
    prediction_log.start()
    closers.append(prediction_log.close)

    cache = ResponseCache(settings.cache_bytes)
    unregister = metrics.register_collector(lambda: scoring_metrics.collector(cache, backends))
    closers.append(_async(unregister))
    service = ScoringService(
        router,
        backends,
        batcher,
        cache,
        prediction_log,
        ScoringLimits(
            max_request_bytes=settings.max_request_bytes,
            default_deadline_s=settings.mesh.default_deadline_s,
            canary_interval_s=settings.canary_interval_s,
        ),
    )
    if settings.canary_interval_s > 0:
        closers.append(_every(settings.canary_interval_s, service.check_loaded))
    server = MeshServer(
        "scoring",
        [
            Registration(
                INFERENCE_SERVICE,
                pb_grpc.add_GRPCInferenceServiceServicer_to_server,
                InferenceServicer(service),
            ),
            Registration(
                FEEDBACK_SERVICE, scoring_pb2_grpc.add_ScoringServicer_to_server, ScoringServicer(store)
            ),
        ],
        settings.mesh,
        host=settings.host,
        port=settings.port,
    )
    return Scoring(server, service, router, backends, batcher, local_triton, closers)


def _async(step: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        step()

    return run


def _shutdown_executor(executor: ThreadPoolExecutor) -> Callable[[], Awaitable[None]]:
    async def shutdown() -> None:
        executor.shutdown(wait=False, cancel_futures=True)

    return shutdown


def _every(interval_s: float, step: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """Starts ``step`` every ``interval_s`` seconds; returns what stops it."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await step()
            except Exception:
                log.exception("periodic %s failed", step)

    task = asyncio.get_running_loop().create_task(loop())

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return stop


async def run(settings: ScoringSettings) -> None:
    async with database(settings.database_url, settings.mesh.home) as database_url:
        scoring = await build_scoring(settings, database_url)
        await serve(scoring.server, cleanup=[scoring.close])


def main() -> None:
    settings = ScoringSettings.from_env()
    configure_logging(settings.mesh.log_level, settings.mesh.log_format)
    flush_traces = setup_tracing("scoremesh-scoring")
    try:
        asyncio.run(run(settings))
    finally:
        flush_traces()
