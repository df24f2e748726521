"""A real Envoy, rendered by the generator, in front of real services on 127.0.0.1.

Two scoring replicas run as ``scoremesh serve scoring`` processes (onnxruntime, a real
registry and PostgreSQL behind them); Envoy must spread calls over both, and when one is
SIGKILLed under load the other must carry every call (Envoy retries resets and refused
connections on the survivor). A second Envoy speaks mutual TLS both ways with a registry that
requires it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from scoremesh.registry.v1 import registry_pb2 as registry_pb
from scoremesh.registry.v1 import registry_pb2_grpc

from bench.common import Service, scoring_env, service_process
from services.certs import CertificateAuthority
from services.gateway.envoy_config import render_yaml
from services.gateway.envoy_mesh import MeshDescription, parse_mesh
from services.mesh.channels import open_channel
from services.mesh.server import address_file
from services.mesh.settings import MeshSettings
from services.scoring.oip import pb_grpc
from services.traces.model import SpanRecord
from services.traces.receiver import OtlpReceiver
from services.traces.settings import TracesSettings
from services.traces.store import TraceStore
from tests import onnx_factory
from tests.envoy_process import RunningEnvoy, running_envoy
from tests.integration.registry_harness import ALICE, RunningRegistry, push, registry_env, running_registry
from tests.integration.scoring_harness import infer_request, publish
from tests.tls_files import envoy_tls, tls_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MODEL = "envoy-clf"
CALL_TIMEOUT_S = 10.0
SPREAD_REQUESTS = 200
LOAD_REQUESTS = 600
KILL_AFTER = 150
CONCURRENCY = 8
LOAD_TIME_LIMIT_S = 90.0
EJECT_TIMEOUT_S = 15.0
ENVOY_SPAN_BATCH = 5
TRACE_TIMEOUT_S = 20.0
FAST_HEALTH_CHECKS = {"interval_s": 0.2, "timeout_s": 1, "unhealthy_threshold": 1, "healthy_threshold": 1}


def _test_mesh(services: dict[str, Any], **options: Any) -> MeshDescription:
    """A mesh on loopback, with no tracing and quick health checks, for these tests."""
    return parse_mesh(
        {
            "listener": {"address": "127.0.0.1", "port": 0},
            "admin": {"address": "127.0.0.1", "port": 0},
            "health_check": FAST_HEALTH_CHECKS,
            "tracing": {"enabled": False},
            "services": services,
            **options,
        }
    )


@contextlib.asynccontextmanager
async def _envoy(mesh: MeshDescription, workdir: Path) -> AsyncIterator[RunningEnvoy]:
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "envoy.yaml"
    config.write_text(render_yaml(mesh))
    async with running_envoy(config, workdir) as envoy:
        yield envoy


@pytest.fixture
async def registry(database_url: str, tmp_path: Path) -> AsyncIterator[RunningRegistry]:
    async with running_registry(registry_env(tmp_path / "registry", database_url)) as running:
        yield running


async def _model_infer_calls(home: Path) -> float:
    """ModelInfer calls a scoring replica answered OK, from its own /metrics."""
    metrics = address_file(home, "scoring-metrics").read_text().strip()
    async with aiohttp.ClientSession() as http, http.get(f"http://{metrics}/metrics") as response:
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "scoremesh_rpc_requests_total"
        and sample.labels.get("method") == "ModelInfer"
        and sample.labels.get("code") == "OK"
    )


@dataclass
class Load:
    completed: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)


async def _bounded_load(
    stub: pb_grpc.GRPCInferenceServiceStub, requests: int, *, on_completed: Any = None
) -> Load:
    """CONCURRENCY callers send ``requests`` calls in all, or as many as LOAD_TIME_LIMIT_S allows;
    ``on_completed(n)`` runs after the n-th success."""
    load = Load()
    remaining = requests
    deadline = time.monotonic() + LOAD_TIME_LIMIT_S
    rows = np.random.default_rng(3).standard_normal((requests, 1, 4)).astype(np.float32)

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            request = infer_request(MODEL, {"input": rows[remaining]})
            try:
                await stub.ModelInfer(request, metadata=ALICE.metadata(), timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                load.failures.append(f"{error.code().name}: {error.details()}")
                continue
            load.completed += 1
            if on_completed is not None:
                on_completed(load.completed)

    await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
    return load


async def test_envoy_spreads_calls_over_replicas_and_the_survivor_carries_a_killed_ones(
    registry: RunningRegistry, database_url: str, tmp_path: Path
) -> None:
    await publish(registry, ALICE, MODEL, onnx_factory.tiny_classifier(seed=5))
    env = scoring_env(database_url, registry.address, "onnxruntime", max_batch_size=8)
    homes = [tmp_path / "scoring-a", tmp_path / "scoring-b"]
    async with contextlib.AsyncExitStack() as stack:
        replicas: list[Service] = [
            await stack.enter_async_context(service_process("scoring", home, env)) for home in homes
        ]
        mesh = _test_mesh(
            {
                "scoring": {
                    "endpoints": [replica.address for replica in replicas],
                    "serves": ["inference.GRPCInferenceService", "scoremesh.scoring.v1"],
                },
                "registry": {"endpoints": [registry.address], "serves": ["scoremesh.registry.v1"]},
            }
        )
        envoy = await stack.enter_async_context(_envoy(mesh, tmp_path / "envoy"))
        await envoy.wait_healthy("scoring", hosts=2)
        await envoy.wait_healthy("registry", hosts=1)
        channel = await stack.enter_async_context(
            open_channel(envoy.listener_address, MeshSettings.from_env({}))
        )
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        # the registry's calls go to the registry cluster, through the same listener
        models = await registry_pb2_grpc.ModelRegistryStub(channel).ListModels(
            registry_pb.ListModelsRequest(), metadata=ALICE.metadata(), timeout=CALL_TIMEOUT_S
        )
        assert [m.name for m in models.models] == [MODEL]

        # spread: both replicas answer a share of the calls
        before = [await _model_infer_calls(home) for home in homes]
        spread = await _bounded_load(stub, SPREAD_REQUESTS)
        assert (spread.completed, spread.failures) == (SPREAD_REQUESTS, [])
        served = [await _model_infer_calls(home) - b for home, b in zip(homes, before, strict=True)]
        assert sum(served) == SPREAD_REQUESTS
        assert min(served) >= SPREAD_REQUESTS * 0.2, served
        hosts = {
            entry["upstream_host"] for entry in envoy.access_log() if entry["path"].endswith("/ModelInfer")
        }
        assert hosts == {replica.address for replica in replicas}

        # one replica dies (SIGKILL: no goodbye, connections reset mid-call) under load
        victim, survivor = replicas
        survivor_before = await _model_infer_calls(homes[1])

        def kill_the_victim(completed: int) -> None:
            if completed == KILL_AFTER:
                os.kill(victim.pid, signal.SIGKILL)

        load = await _bounded_load(stub, LOAD_REQUESTS, on_completed=kill_the_victim)
        retries = await envoy.stat("cluster.scoring.upstream_rq_retry")
        assert load.failures == [], (load.failures[:5], f"{retries} retries")
        assert load.completed == LOAD_REQUESTS
        survivor_served = await _model_infer_calls(homes[1]) - survivor_before
        assert survivor_served >= LOAD_REQUESTS - KILL_AFTER - CONCURRENCY, survivor_served

        # and Envoy's health checks take it out of rotation
        deadline = time.monotonic() + EJECT_TIMEOUT_S
        while (await envoy.host_health("scoring")).get(victim.address, True):
            assert time.monotonic() < deadline, await envoy.host_health("scoring")
            await asyncio.sleep(0.05)
        assert (await envoy.host_health("scoring"))[survivor.address] is True


async def test_unary_calls_are_limited_and_timed_but_streams_are_not(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    mesh = _test_mesh(
        {"registry": {"endpoints": [registry.address], "serves": ["scoremesh.registry.v1"]}},
        max_message_bytes="1MiB",
        unary_timeout_s=1,
    )
    async with (
        _envoy(mesh, tmp_path / "envoy") as envoy,
        open_channel(envoy.listener_address, MeshSettings.from_env({})) as channel,
    ):
        await envoy.wait_healthy("registry", hosts=1)
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        # a unary request over the limit stops at Envoy, as the services would answer it
        big = registry_pb.Model(name="big", description="x" * (2 * 1024**2))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateModel(
                registry_pb.CreateModelRequest(model=big), metadata=ALICE.metadata(), timeout=CALL_TIMEOUT_S
            )
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1048576" in (caught.value.details() or "")
        # a watch outlives the unary timeout, and an upload of many 64 KiB messages is not
        # held to the one-message limit
        watch = stub.WatchModels(
            registry_pb.WatchModelsRequest(models=["streamed"]), metadata=ALICE.metadata()
        )
        await asyncio.sleep(mesh.unary_timeout_s * 1.5)  # past the unary timeout, on purpose
        pushed = await push(
            registry_pb2_grpc.ModelRegistryStub(channel),
            ALICE,
            "streamed",
            onnx_factory.large_model(3 * 1024**2),
        )
        assert pushed.version.status == 1, pushed.version.verification
        event = await asyncio.wait_for(watch.read(), CALL_TIMEOUT_S)
        assert (event.model, event.version) == ("streamed", 1)
        watch.cancel()


async def test_envoy_continues_the_callers_trace_and_exports_its_spans(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    home = tmp_path / "traces"
    mesh_settings = MeshSettings.from_env({"SCOREMESH_HOME": str(home), "SCOREMESH_SHUTDOWN_GRACE_S": "1"})
    traces = TracesSettings.from_env(home, {})
    async with OtlpReceiver(traces, mesh_settings) as receiver:
        mesh = _test_mesh(
            {"registry": {"endpoints": [registry.address], "serves": ["scoremesh.registry.v1"]}},
            tracing={"enabled": True, "collector": receiver.grpc_address, "service_name": "envoy-under-test"},
        )
        async with (
            _envoy(mesh, tmp_path / "envoy") as envoy,
            open_channel(envoy.listener_address, MeshSettings.from_env({})) as channel,
        ):
            await envoy.wait_healthy("registry", hosts=1)
            stub = registry_pb2_grpc.ModelRegistryStub(channel)

            async def calls(traceparent: str) -> None:
                # Envoy sends its spans in batches of five (or every five seconds)
                for _ in range(ENVOY_SPAN_BATCH):
                    metadata = (*ALICE.metadata(), ("traceparent", traceparent))
                    await stub.ListModels(
                        registry_pb.ListModelsRequest(), metadata=metadata, timeout=CALL_TIMEOUT_S
                    )

            unsampled, trace_id, parent = secrets.token_hex(16), secrets.token_hex(16), secrets.token_hex(8)
            await calls(f"00-{unsampled}-{parent}-00")
            await calls(f"00-{trace_id}-{parent}-01")
            spans = await _spans_of(traces.store_path, trace_id, ENVOY_SPAN_BATCH)
            # the caller's "not sampled" holds too: had those calls made spans, a batch of
            # them would have gone first
            assert await envoy.stat("tracing.opentelemetry.spans_sent") == ENVOY_SPAN_BATCH
    assert {span.service for span in spans} == {"envoy-under-test"}
    assert {span.parent_span_id for span in spans} == {parent}
    # and the registry saw Envoy's span as its caller's
    seen = [entry["traceparent"] for entry in envoy.access_log()]
    assert all(value.startswith(f"00-{trace_id}-") for value in seen[-ENVOY_SPAN_BATCH:]), seen


async def _spans_of(store_path: Path, trace_id: str, count: int) -> list[SpanRecord]:
    deadline = time.monotonic() + TRACE_TIMEOUT_S
    while True:
        store = TraceStore.open_reader(store_path)
        spans = store.spans(trace_id) if store is not None else []
        if store is not None:
            store.close()
        if len(spans) >= count:
            return spans
        assert time.monotonic() < deadline, f"{len(spans)} of {count} spans arrived"
        await asyncio.sleep(0.1)


# mutual TLS through Envoy


@pytest.fixture
def certificates(tmp_path: Path) -> Path:
    """``registry/``, ``envoy/`` and ``client/`` certificate folders, from one CA."""
    directory = tmp_path / "tls"
    authority = CertificateAuthority.create()
    # the services' name is a wildcard one, as a mesh certificate for every pod would be
    authority.issue("registry", ["*.mesh.test", "127.0.0.1"]).write(directory / "registry")
    authority.issue("envoy", ["envoy.mesh.test", "127.0.0.1"]).write(directory / "envoy")
    authority.issue("client", ["client.mesh.test"]).write(directory / "client")
    return directory


async def test_envoy_speaks_mutual_tls_both_ways(
    database_url: str, tmp_path: Path, certificates: Path
) -> None:
    env = registry_env(tmp_path / "registry", database_url, **tls_env(certificates / "registry"))
    async with running_registry(env) as registry:
        mesh = _test_mesh(
            {
                "registry": {
                    "endpoints": [registry.address],
                    "serves": ["scoremesh.registry.v1"],
                    "server_name": "registry.mesh.test",
                }
            },
            tls={"enabled": True, **dataclasses.asdict(envoy_tls(certificates / "envoy"))},
        )
        async with _envoy(mesh, tmp_path / "envoy") as envoy:
            # health checks pass over TLS, with Envoy's client certificate
            await envoy.wait_healthy("registry", hosts=1)
            client = MeshSettings.from_env(tls_env(certificates / "client"))
            async with open_channel(envoy.listener_address, client) as channel:
                await registry_pb2_grpc.ModelRegistryStub(channel).CreateModel(
                    registry_pb.CreateModelRequest(model=registry_pb.Model(name="tls-model")),
                    metadata=ALICE.metadata(),
                    timeout=CALL_TIMEOUT_S,
                )
            assert (
                await registry.stub.GetModel(
                    registry_pb.GetModelRequest(name="tls-model"),
                    metadata=ALICE.metadata(),
                    timeout=CALL_TIMEOUT_S,
                )
            ).name == "tls-model"
            # a caller without a certificate does not get through Envoy
            no_certificate = grpc.ssl_channel_credentials(
                root_certificates=(certificates / "client" / "ca.crt").read_bytes()
            )
            async with grpc.aio.secure_channel(envoy.listener_address, no_certificate) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await registry_pb2_grpc.ModelRegistryStub(channel).ListModels(
                        registry_pb.ListModelsRequest(), metadata=ALICE.metadata(), timeout=CALL_TIMEOUT_S
                    )
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            async with grpc.aio.insecure_channel(envoy.listener_address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S
                    )
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
