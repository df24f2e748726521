"""Sampling is the standard variables' business: a registry process told to sample nothing
exports no span, one told to sample everything exports its calls and their queries."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest
from scoremesh.registry.v1 import registry_pb2 as pb
from scoremesh.registry.v1 import registry_pb2_grpc

from services.mesh.server import address_file
from services.mesh.settings import MeshSettings
from services.traces.receiver import OtlpReceiver
from services.traces.settings import TracesSettings
from services.traces.store import TraceStore
from tests.integration.registry_harness import ALICE

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 60.0


async def _spans_from_a_registry(database_url: str, home: Path, receiver: OtlpReceiver, **otel: str) -> int:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "SCOREMESH_"))}
    env.update(
        {
            "SCOREMESH_HOME": str(home),
            "SCOREMESH_DATABASE_URL": database_url,
            "SCOREMESH_REGISTRY_PORT": "0",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.http_address}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            **otel,
        }
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "serve", "registry", env=env
    )
    try:
        path = address_file(home, "registry")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not path.exists():
            assert process.returncode is None
            assert loop.time() < deadline, "the registry did not start"
            await asyncio.sleep(0.02)
        async with grpc.aio.insecure_channel(path.read_text().strip()) as channel:
            stub = registry_pb2_grpc.ModelRegistryStub(channel)
            for _ in range(5):
                await stub.ListModels(pb.ListModelsRequest(), metadata=ALICE.metadata(), timeout=10)
        # a clean stop flushes the spans it kept
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    await receiver.stop()  # commits what arrived
    store = TraceStore.open_reader(receiver.settings.store_path)
    if store is None:
        return 0
    try:
        return store.count()[1]
    finally:
        store.close()


@pytest.mark.parametrize(
    ("sampler", "spans_expected"), [("always_off", False), ("parentbased_always_on", True)]
)
async def test_the_sampler_decides_what_is_exported(
    database_url: str, tmp_path: Path, sampler: str, spans_expected: bool
) -> None:
    home = tmp_path / "home"
    mesh = MeshSettings.from_env({"SCOREMESH_HOME": str(home), "SCOREMESH_SHUTDOWN_GRACE_S": "2"})
    receiver = OtlpReceiver(TracesSettings.from_env(home, {}), mesh)
    await receiver.start()
    try:
        spans = await _spans_from_a_registry(database_url, home, receiver, OTEL_TRACES_SAMPLER=sampler)
    finally:
        await receiver.stop()
    assert (spans > 0) is spans_expected, spans


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_TRACES_SAMPLER", "bogus"),
        ("OTEL_TRACES_SAMPLER_ARG", "2"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
    ],
)
async def test_a_bad_tracing_variable_stops_the_service_with_one_line_naming_it(
    tmp_path: Path, variable: str, value: str
) -> None:
    env = {key: item for key, item in os.environ.items() if not key.startswith(("OTEL_", "SCOREMESH_"))}
    env.update(
        {
            "SCOREMESH_HOME": str(tmp_path / "home"),
            "SCOREMESH_REGISTRY_PORT": "0",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            variable: value,
        }
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "serve",
        "registry",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), START_TIMEOUT_S)
    assert process.returncode == 2
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("scoremesh: "), lines
    assert variable in lines[0], lines
