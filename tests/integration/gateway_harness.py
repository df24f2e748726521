"""The gateway as its main builds it, on an aiohttp test server on 127.0.0.1, in front of real
services; and the whole mesh (registry, scoring on onnxruntime, gateway) for end-to-end tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc.aio
from aiohttp.test_utils import TestServer
from scoremesh.gateway.v1.admin_pb2_grpc import add_AdminServicer_to_server

from services.gateway.admin_servicer import AdminServicer
from services.gateway.keys import KeyStore, RateLimit
from services.gateway.main import ADMIN, REGISTRY, SCORING, TRAINING, build_gateway
from services.gateway.quotas import RateLimiter, UsageRecorder
from services.mesh.channels import open_channel
from services.mesh.server import MeshServer, Registration
from services.mesh.settings import MeshSettings
from tests.integration.registry_harness import registry_env, running_registry
from tests.integration.scoring_harness import running_scoring, scoring_env
from tests.integration.training_harness import running_training, training_env

MAX_BODY = 64 * 1024
ADMIN_SETTINGS = MeshSettings.from_env({"SCOREMESH_INTERNAL_TOKEN": "gateway-harness-internal-token"})


@dataclass
class RunningGateway:
    url: str
    http: aiohttp.ClientSession
    keys: KeyStore
    usage: UsageRecorder
    admin: grpc.aio.Channel
    """A mesh channel (with the internal token) to the gateway's Admin service."""
    admin_address: str

    async def key(self, tenant: str, *scopes: str, rate: RateLimit | None = None) -> dict[str, str]:
        """Headers carrying a new key of ``tenant`` with ``scopes``."""
        _, plaintext = await self.keys.create(tenant, scopes, created_by="test", rate=rate)
        return {"Authorization": f"Bearer {plaintext}"}


@contextlib.asynccontextmanager
async def serving_gateway(
    database_url: str,
    channels: Mapping[str, grpc.aio.Channel],
    inference: grpc.aio.Channel | None = None,
    *,
    max_body_bytes: int = MAX_BODY,
) -> AsyncIterator[RunningGateway]:
    """The gateway in front of ``channels`` (full service name → channel) and of its own
    Admin service, served as main serves it (with an internal token)."""
    keys = await KeyStore.open(database_url)
    usage = UsageRecorder(keys)
    usage.start()
    admin_server = MeshServer(
        "gateway-admin",
        [Registration(ADMIN.full_name, add_AdminServicer_to_server, AdminServicer(keys, usage))],
        ADMIN_SETTINGS,
    )
    await admin_server.start()
    try:
        async with open_channel(admin_server.address, ADMIN_SETTINGS) as admin:
            app = build_gateway(
                channels={**channels, ADMIN.full_name: admin},
                keys=keys,
                usage=usage,
                limiter=RateLimiter(),
                max_body_bytes=max_body_bytes,
                call_timeout_s=30.0,
                inference=inference,
            ).application()
            server = TestServer(app, host="127.0.0.1", port=0)
            await server.start_server()
            try:
                async with aiohttp.ClientSession() as http:
                    url = str(server.make_url("")).rstrip("/")
                    yield RunningGateway(url, http, keys, usage, admin, admin_server.address)
            finally:
                await server.close()
    finally:
        await admin_server.stop(0)
        await usage.close()
        await keys.close()


@contextlib.asynccontextmanager
async def running_mesh(database_url: str, workdir: Path) -> AsyncIterator[RunningGateway]:
    """Registry, scoring on onnxruntime (in-process: no Triton to start), training (no
    workers: jobs stay queued) and the gateway in front of them, with its /v2 routes."""
    async with running_registry(registry_env(workdir / "registry", database_url)) as registry:
        env = scoring_env(
            workdir / "scoring", database_url, registry.address, SCOREMESH_SCORING_BACKEND="onnxruntime"
        )
        async with (
            running_scoring(env) as scoring,
            running_training(
                training_env(workdir / "training", database_url, registry.address), scoring.channel
            ) as training,
            serving_gateway(
                database_url,
                {
                    REGISTRY.full_name: registry.channel,
                    SCORING.full_name: scoring.channel,
                    TRAINING.full_name: training.channel,
                },
                scoring.channel,
            ) as gateway,
        ):
            yield gateway
