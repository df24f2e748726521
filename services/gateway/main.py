"""The gateway's composition root: settings → key store, channels to the services, router,
OpenAPI document → the aiohttp server, announced like the gRPC services."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from typing import Final

import grpc.aio
from aiohttp import web
from google.protobuf.descriptor import ServiceDescriptor
from scoremesh.gateway.v1 import admin_pb2
from scoremesh.gateway.v1.admin_pb2_grpc import add_AdminServicer_to_server
from scoremesh.registry.v1 import registry_pb2
from scoremesh.scoring.v1 import scoring_pb2
from scoremesh.training.v1 import training_pb2

from services import version
from services.gateway.admin_servicer import AdminServicer
from services.gateway.app import Gateway
from services.gateway.http_rules import bindings_of
from services.gateway.keys import KeyStore, RateLimit, ensure_admin_key
from services.gateway.openapi import openapi_document
from services.gateway.quotas import RateLimiter, UsageRecorder
from services.gateway.settings import GatewaySettings
from services.gateway.transcoding import Router
from services.mesh.channels import open_channel, open_lean_channel
from services.mesh.postgres import database
from services.mesh.server import MeshServer, Registration, address_file, announce, serve
from services.mesh.telemetry import configure_logging, setup_tracing

log = logging.getLogger(__name__)

REGISTRY = registry_pb2.DESCRIPTOR.services_by_name["ModelRegistry"]
SCORING = scoring_pb2.DESCRIPTOR.services_by_name["Scoring"]
TRAINING = training_pb2.DESCRIPTOR.services_by_name["Training"]
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
SERVICES: Final[Mapping[str, ServiceDescriptor]] = {
    s.full_name: s for s in (REGISTRY, SCORING, TRAINING, ADMIN)
}
"""Every service whose annotated RPCs the gateway serves under /v1, by full name."""


def build_gateway(
    *,
    channels: Mapping[str, grpc.aio.Channel],
    keys: KeyStore,
    usage: UsageRecorder,
    limiter: RateLimiter,
    max_body_bytes: int,
    call_timeout_s: float,
    inference: grpc.aio.Channel | None,
    internal_token: str | None = None,
) -> Gateway:
    """The gateway for the services in ``channels`` (full name → channel; each one of
    :data:`SERVICES`): routes and OpenAPI document from their descriptors, /v2 through
    ``inference`` when given."""
    bindings = bindings_of([SERVICES[name] for name in channels])
    document = openapi_document(bindings, title="scoremesh", version=version())
    return Gateway(
        router=Router(bindings),
        channels=channels,
        keys=keys,
        limiter=limiter,
        usage=usage,
        max_body_bytes=max_body_bytes,
        openapi_json=json.dumps(document).encode(),
        call_timeout_s=call_timeout_s,
        inference=inference,
        internal_token=internal_token,
    )


async def run(settings: GatewaySettings) -> None:
    """Serves until SIGTERM or SIGINT: the Admin service over gRPC, and HTTP in front of the
    registry, scoring and that Admin service."""
    async with (
        database(settings.database_url, settings.mesh.home) as database_url,
        open_channel(settings.registry_addr, settings.mesh) as registry,
        open_channel(settings.scoring_addr, settings.mesh) as scoring,
        open_channel(settings.training_addr, settings.mesh) as training,
        open_lean_channel(settings.scoring_addr, settings.mesh) as inference,
    ):
        keys = await KeyStore.open(database_url)
        usage = UsageRecorder(keys)
        usage.start()
        try:
            admin_key = await ensure_admin_key(settings.mesh.home, keys)
            if admin_key:
                print(
                    f"admin key (shown once, also in {settings.mesh.home / 'admin.key'}): {admin_key}",
                    flush=True,
                )
            admin_server = MeshServer(
                "gateway-admin",
                [Registration(ADMIN.full_name, add_AdminServicer_to_server, AdminServicer(keys, usage))],
                settings.mesh,
                host=settings.host,
                port=settings.grpc_port,
            )
            await admin_server.start()
            # announced before the HTTP address, which tells `scoremesh up` the gateway is up
            announce(address_file(settings.mesh.home, admin_server.name), admin_server.address)
            # by loopback: a wildcard host is no name that a TLS certificate carries
            async with open_channel(admin_server.local_address, settings.mesh) as admin:
                gateway = build_gateway(
                    channels={
                        REGISTRY.full_name: registry,
                        SCORING.full_name: scoring,
                        TRAINING.full_name: training,
                        ADMIN.full_name: admin,
                    },
                    keys=keys,
                    usage=usage,
                    limiter=RateLimiter(RateLimit(settings.rate_per_second, settings.burst)),
                    max_body_bytes=settings.max_body_bytes,
                    call_timeout_s=settings.mesh.default_deadline_s,
                    inference=inference,
                    internal_token=settings.mesh.internal_token,
                )
                runner = web.AppRunner(gateway.application(), access_log=None)
                await runner.setup()
                try:
                    await web.TCPSite(runner, settings.host, settings.port).start()
                    port = runner.addresses[0][1]
                    announced = announce(
                        address_file(settings.mesh.home, "gateway"), f"{settings.host}:{port}"
                    )
                    log.info("gateway listening on http://%s:%d", settings.host, port)
                    try:
                        await serve(admin_server)
                    finally:
                        announced.unlink(missing_ok=True)
                finally:
                    await runner.cleanup()
        finally:
            await usage.close()
            await keys.close()


def main() -> None:
    settings = GatewaySettings.from_env()
    configure_logging(settings.mesh.log_level, settings.mesh.log_format)
    flush_traces = setup_tracing("scoremesh-gateway")
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run(settings))
    finally:
        flush_traces()
