"""Mutual TLS in the kernel, with real servers on 127.0.0.1 and certificates made here.

With SCOREMESH_TLS_* set, a mesh server takes calls only from clients presenting a certificate
its CA signed, and a mesh channel takes only servers whose certificate its CA signed for the
name it dialled. Whoever fails that gets UNAVAILABLE (the handshake fails before any call),
and the server carries on. Scoring's channel to a remote Triton speaks the same TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bench.common import stop_process
from services.certs import CertificateAuthority
from services.mesh.channels import open_channel
from services.mesh.children import child_env
from services.mesh.server import MeshServer
from services.mesh.settings import TLS_FILE_VARIABLES, MeshSettings
from services.scoring.triton_backend import TritonBackend
from services.scoring.triton_server import find_triton, listening_port
from tests.tls_files import tls_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CALL_TIMEOUT_S = 10.0
START_TIMEOUT_S = 60.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class Pki:
    """Two unrelated CAs, and where their certificates are written."""

    directory: Path
    mesh: CertificateAuthority
    stranger: CertificateAuthority

    def env(
        self, name: str, hosts: list[str], *, authority: CertificateAuthority | None = None
    ) -> dict[str, str]:
        """SCOREMESH_TLS_* for a new certificate ``name`` naming ``hosts``, signed by
        ``authority`` (default: the mesh's CA), trusting the mesh's CA whoever signed it."""
        mesh_ca = self.directory / "mesh-ca.crt"
        mesh_ca.write_bytes(self.mesh.certificate_pem)
        folder = (authority or self.mesh).issue(name, hosts).write(self.directory / name)
        return tls_env(folder, ca_file=mesh_ca)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path, CertificateAuthority.create(), CertificateAuthority.create("a stranger's CA"))


@contextlib.asynccontextmanager
async def _server(env: Mapping[str, str]) -> AsyncIterator[MeshServer]:
    server = MeshServer("probe", [], MeshSettings.from_env(env))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


async def _health(channel: grpc.aio.Channel) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S
    )
    return int(response.status)


async def _refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _health(channel)
    return caught.value.code()


def _credentials(env: Mapping[str, str], *, with_certificate: bool = True) -> grpc.ChannelCredentials:
    cert, key, ca = (Path(env[name]).read_bytes() for name in TLS_FILE_VARIABLES)
    if not with_certificate:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


async def test_only_clients_with_a_mesh_certificate_get_in(pki: Pki) -> None:
    async with _server(pki.env("server", ["localhost", "127.0.0.1"])) as server:
        client = MeshSettings.from_env(pki.env("client", ["client.mesh"]))
        async with open_channel(server.address, client) as channel:
            assert await _health(channel) == SERVING

        no_certificate = _credentials(pki.env("anonymous", ["x"]), with_certificate=False)
        async with grpc.aio.secure_channel(server.address, no_certificate) as channel:
            assert await _refused(channel) == grpc.StatusCode.UNAVAILABLE
        # a well-formed certificate, from a CA the server does not trust
        stranger = _credentials(pki.env("stranger", ["client.mesh"], authority=pki.stranger))
        async with grpc.aio.secure_channel(server.address, stranger) as channel:
            assert await _refused(channel) == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(server.address) as channel:
            assert await _refused(channel) == grpc.StatusCode.UNAVAILABLE
        # and a plaintext mesh channel (no TLS settings) against it
        async with open_channel(server.address, MeshSettings.from_env({})) as channel:
            assert await _refused(channel) == grpc.StatusCode.UNAVAILABLE

        # the server shrugged them all off
        async with open_channel(server.address, client) as channel:
            assert await _health(channel) == SERVING


async def test_clients_check_the_server_certificate_and_its_name(pki: Pki) -> None:
    client_env = pki.env("client", ["client.mesh"])
    client = MeshSettings.from_env(client_env)
    # signed by a CA the client does not trust
    async with (
        _server(pki.env("impostor", ["127.0.0.1"], authority=pki.stranger)) as impostor,
        open_channel(impostor.address, client) as channel,
    ):
        assert await _refused(channel) == grpc.StatusCode.UNAVAILABLE
    # the mesh's CA, but for another name than the address dialled: refused, unless the
    # client is told which name to expect
    async with _server(pki.env("registry", ["registry.mesh"])) as server:
        async with open_channel(server.address, client) as channel:
            assert await _refused(channel) == grpc.StatusCode.UNAVAILABLE
        named = MeshSettings.from_env({**client_env, "SCOREMESH_TLS_SERVER_NAME": "registry.mesh"})
        async with open_channel(server.address, named) as channel:
            assert await _health(channel) == SERVING


async def test_the_health_port_answers_health_alone_in_plaintext(pki: Pki) -> None:
    env = {**pki.env("server", ["127.0.0.1"]), "SCOREMESH_HEALTH_PORT": "0"}
    async with _server(env) as server:
        assert server.health_port is not None
        assert server.health_port != server.port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
            assert await _health(channel) == SERVING
            # it is the server's own health: a service going out of rotation shows here too
            await server.set_serving("", False)
            assert await _health(channel) == NOT_SERVING
            # and nothing but health is served without TLS
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in call:
                    pass
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


# Triton with --grpc-use-ssl-mutual, as the cluster runs it


@contextlib.asynccontextmanager
async def _tls_triton(workdir: Path, env: Mapping[str, str]) -> AsyncIterator[str]:
    """A tritonserver (no models) that requires mutual TLS; yields its ``127.0.0.1:port``."""
    installation = find_triton()
    cert, key, ca = (env[name] for name in TLS_FILE_VARIABLES)
    (workdir / "models").mkdir()
    (workdir / "backends").mkdir()
    process_env = child_env(threads=None)
    process_env["LD_LIBRARY_PATH"] = str(installation.library_dir)
    with (workdir / "triton.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            str(installation.binary),
            f"--model-repository={workdir / 'models'}",
            f"--backend-directory={workdir / 'backends'}",
            "--model-control-mode=explicit",
            "--grpc-address=127.0.0.1",
            "--grpc-port=0",
            "--allow-http=false",
            "--allow-metrics=false",
            "--grpc-use-ssl=true",
            "--grpc-use-ssl-mutual=true",
            f"--grpc-server-cert={cert}",
            f"--grpc-server-key={key}",
            f"--grpc-root-cert={ca}",
            env=process_env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (port := listening_port(process.pid)):
            assert process.returncode is None, (workdir / "triton.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "tritonserver opened no port"
            await asyncio.sleep(0.02)
        yield f"127.0.0.1:{port}"
    finally:
        await asyncio.shield(stop_process(process))


async def test_the_triton_backend_speaks_mutual_tls_to_a_remote_triton(pki: Pki, tmp_path: Path) -> None:
    async with _tls_triton(tmp_path / "triton", pki.env("triton", ["127.0.0.1"])) as url:
        tls = MeshSettings.from_env(pki.env("scoring", ["scoring.mesh"])).tls
        backend = TritonBackend(url, max_message_bytes=1024**2, tls=tls)
        plaintext = TritonBackend(url, max_message_bytes=1024**2)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not await backend.healthy():
                assert time.monotonic() < deadline, "Triton never answered over mutual TLS"
                await asyncio.sleep(0.05)
            assert not await plaintext.healthy()
        finally:
            await backend.close()
            await plaintext.close()
