"""The mesh's internal token: with one configured, a service refuses calls that lack it, except
health and reflection; mesh channels carry it; ``scoremesh up`` makes one the CLI finds."""

from __future__ import annotations

import stat
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from scoremesh.registry.v1 import registry_pb2 as pb
from scoremesh.registry.v1 import registry_pb2_grpc

from services.mesh.settings import MeshSettings
from services.mesh.status import from_rpc_error
from services.registry.client import Reference, RegistryClient
from services.up import ensure_internal_token
from tests import onnx_factory
from tests.integration.registry_harness import ALICE, registry_env, running_registry

pytestmark = pytest.mark.integration

TOKEN = "a-test-secret-of-some-length"


async def test_calls_without_the_token_are_unauthenticated(database_url: str, tmp_path: Path) -> None:
    env = registry_env(tmp_path / "home", database_url, SCOREMESH_INTERNAL_TOKEN=TOKEN)
    async with running_registry(env) as registry:
        # the harness's channel is a mesh channel: every kind of call carries the token
        assert registry.registry.server.settings.internal_token == TOKEN
        await registry.stub.ListModels(pb.ListModelsRequest(), metadata=ALICE.metadata(), timeout=10)
        client = RegistryClient(registry.channel, ALICE)
        model = tmp_path / "m.onnx"
        model.write_bytes(onnx_factory.tiny_classifier())
        pushed = await client.push("tokened", model)  # client streaming
        await client.pull(Reference("tokened", version=1), tmp_path / "copy.onnx")  # server streaming
        assert (tmp_path / "copy.onnx").read_bytes() == model.read_bytes()
        assert pushed.version.version == 1

        async with grpc.aio.insecure_channel(registry.address) as bare:
            stub = registry_pb2_grpc.ModelRegistryStub(bare)
            for metadata in (ALICE.metadata(), (*ALICE.metadata(), ("x-scoremesh-internal", "wrong"))):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert from_rpc_error(caught.value).reason == "INTERNAL_TOKEN_REQUIRED"
            # probes carry no secret
            health = await health_pb2_grpc.HealthStub(bare).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            ok = await stub.ListModels(
                pb.ListModelsRequest(),
                metadata=(*ALICE.metadata(), ("x-scoremesh-internal", TOKEN)),
                timeout=10,
            )
            assert [m.name for m in ok.models] == ["tokened"]


def test_up_writes_a_private_token_that_settings_read(tmp_path: Path) -> None:
    home = tmp_path / "home"
    settings = MeshSettings.from_env({"SCOREMESH_HOME": str(home)})
    assert settings.internal_token is None
    token = ensure_internal_token(settings)
    path = home / "internal.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert MeshSettings.from_env({"SCOREMESH_HOME": str(home)}).internal_token == token
    # a configured token wins, and is not replaced
    configured = MeshSettings.from_env({"SCOREMESH_HOME": str(home), "SCOREMESH_INTERNAL_TOKEN": "x" * 20})
    assert ensure_internal_token(configured) == "x" * 20
    assert path.read_text().strip() == token
