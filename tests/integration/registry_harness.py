"""A registry built by the production factory on 127.0.0.1:0, with a channel to it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from scoremesh.registry.v1 import registry_pb2 as pb
from scoremesh.registry.v1 import registry_pb2_grpc

from services.mesh.channels import open_channel
from services.mesh.identity import Caller
from services.registry.main import Registry, build_registry
from services.registry.settings import RegistrySettings

ALICE = Caller(tenant="acme", principal="alice")
BOB = Caller(tenant="globex", principal="bob")
CAROL = Caller(tenant="acme", principal="carol")


@dataclass
class RunningRegistry:
    registry: Registry
    settings: RegistrySettings
    channel: grpc.aio.Channel
    address: str

    @property
    def stub(self) -> registry_pb2_grpc.ModelRegistryStub:
        return registry_pb2_grpc.ModelRegistryStub(self.channel)

    @property
    def home(self) -> Path:
        return self.settings.mesh.home


def registry_env(home: Path, database_url: str, **overrides: str) -> dict[str, str]:
    return {
        "SCOREMESH_HOME": str(home),
        "SCOREMESH_DATABASE_URL": database_url,
        "SCOREMESH_REGISTRY_PORT": "0",
        "SCOREMESH_MAX_UPLOAD_BYTES": "8MiB",
        "SCOREMESH_LOG_FORMAT": "text",
        **overrides,
    }


@contextlib.asynccontextmanager
async def running_registry(env: Mapping[str, str]) -> AsyncIterator[RunningRegistry]:
    settings = RegistrySettings.from_env(env)
    assert settings.database_url
    registry = await build_registry(settings, settings.database_url)
    try:
        port = await registry.server.start()
        address = f"127.0.0.1:{port}"
        async with open_channel(address, settings.mesh) as channel:
            yield RunningRegistry(registry, settings, channel, address)
    finally:
        await registry.server.stop(0)
        await registry.close()


def upload_requests(
    model: str, data: bytes, *, chunk_bytes: int = 64 * 1024, **metadata: Any
) -> list[pb.UploadVersionRequest]:
    requests = [pb.UploadVersionRequest(metadata=pb.UploadVersionMetadata(model=model, **metadata))]
    requests += [
        pb.UploadVersionRequest(chunk=data[offset : offset + chunk_bytes])
        for offset in range(0, len(data), chunk_bytes)
    ]
    return requests


async def push(
    stub: registry_pb2_grpc.ModelRegistryStub,
    caller: Caller,
    model: str,
    data: bytes,
    **metadata: Any,
) -> pb.UploadVersionResponse:
    response: pb.UploadVersionResponse = await stub.UploadVersion(
        iter(upload_requests(model, data, **metadata)), metadata=caller.metadata(), timeout=60
    )
    return response


def error_details(error: grpc.aio.AioRpcError) -> tuple[str, Sequence[str]]:
    """The ErrorInfo reason and the BadRequest fields of a failed call."""
    from services.mesh.errors import InvalidArgument
    from services.mesh.status import from_rpc_error

    domain = from_rpc_error(error)
    fields = [v.field for v in domain.violations] if isinstance(domain, InvalidArgument) else []
    return domain.reason, fields
