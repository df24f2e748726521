"""The registry and the mesh as real processes: the CLI, signals, ``scoremesh up``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from scoremesh.registry.v1 import registry_pb2 as pb
from scoremesh.registry.v1 import registry_pb2_grpc

from services.mesh.postgres import EmbeddedPostgres
from services.mesh.server import address_file
from tests import onnx_factory
from tests.integration.cli_harness import run_cli
from tests.integration.registry_harness import (
    ALICE,
    RunningRegistry,
    registry_env,
    running_registry,
    upload_requests,
)

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 60.0


async def _wait_for_address(home: Path, process: asyncio.subprocess.Process, name: str = "registry") -> str:
    path = address_file(home, name)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT_S
    while not path.exists():
        assert process.returncode is None, f"{name} exited with {process.returncode}"
        assert loop.time() < deadline, f"{name} did not announce its address"
        await asyncio.sleep(0.02)
    return path.read_text().strip()


async def _start_registry(env: Mapping[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "serve", "registry", env={**os.environ, **env}
    )


@pytest.fixture
async def reg(database_url: str, tmp_path: Path) -> AsyncIterator[RunningRegistry]:
    async with running_registry(registry_env(tmp_path / "home", database_url)) as running:
        yield running


async def test_cli_push_list_show_alias_pull(reg: RunningRegistry, tmp_path: Path) -> None:
    env = {"SCOREMESH_REGISTRY_ADDR": reg.address, "SCOREMESH_TENANT": "acme", "SCOREMESH_PRINCIPAL": "alice"}
    model = tmp_path / "model.onnx"
    model.write_bytes(onnx_factory.tiny_classifier(seed=1))
    second = tmp_path / "second.onnx"
    second.write_bytes(onnx_factory.tiny_classifier(seed=2))

    code, out, _ = await run_cli(env, "models", "push", "clf", str(model), "--alias", "production", "--json")
    assert code == 0
    pushed = json.loads(out)
    assert (pushed["model"], pushed["version"], pushed["created"]) == ("clf", "1", True)
    assert len(pushed["sha256"]) == 64
    code, out, _ = await run_cli(env, "models", "push", "clf", str(second), "--json")
    assert json.loads(out)["version"] == "2"

    code, out, _ = await run_cli(env, "models", "list", "--json")
    assert [m["name"] for m in json.loads(out)] == ["clf"]
    code, out, _ = await run_cli(env, "models", "alias", "clf", "staging", "2", "--json")
    assert (json.loads(out)["alias"], json.loads(out)["version"]) == ("staging", "2")
    code, out, _ = await run_cli(env, "models", "show", "clf", "--json")
    shown = json.loads(out)
    assert [v["version"] for v in shown["versions"]] == ["2", "1"]
    assert {a["alias"]: a["version"] for a in shown["aliases"]} == {"production": "1", "staging": "2"}

    pulled = tmp_path / "pulled.onnx"
    code, out, _ = await run_cli(env, "models", "pull", "clf@staging", str(pulled))
    assert code == 0
    assert pulled.read_bytes() == second.read_bytes()
    code, _, _ = await run_cli(env, "models", "pull", "clf:1", str(pulled))
    assert pulled.read_bytes() == model.read_bytes()

    code, out, _ = await run_cli(env, "models", "show", "clf")
    assert code == 0
    assert "production" in out
    assert "staging" in out


async def test_cli_failures_exit_non_zero_with_one_line(reg: RunningRegistry, tmp_path: Path) -> None:
    env = {"SCOREMESH_REGISTRY_ADDR": reg.address}
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    cases = [
        (("models", "push", "m", str(tmp_path / "missing.onnx")), 2, "no such file"),
        (("models", "push", "m", str(junk)), 1, "NOT_ONNX"),
        (("models", "pull", "nope@production", str(tmp_path / "x")), 1, "not found"),
        (("models", "pull", "bad:ref:x", str(tmp_path / "x")), 1, "reference"),
        (("models", "alias", "nope", "production", "1"), 1, "not found"),
    ]
    for args, expected_code, fragment in cases:
        code, _, err = await run_cli(env, *args)
        assert code == expected_code, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("scoremesh: ")
        assert fragment.lower() in lines[0].lower(), lines[0]
    code, _, err = await run_cli(
        {"SCOREMESH_REGISTRY_ADDR": "127.0.0.1:1", "SCOREMESH_DEFAULT_DEADLINE_S": "2"}, "models", "list"
    )
    assert code == 1
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL])
async def test_a_registry_stopped_during_an_upload_shows_nothing_after_restart(
    database_url: str, tmp_path: Path, stop_signal: signal.Signals
) -> None:
    home = tmp_path / "home"
    env = registry_env(home, database_url, SCOREMESH_SHUTDOWN_GRACE_S="1")
    process = await _start_registry(env)
    address = await _wait_for_address(home, process)
    data = onnx_factory.large_model(2 * 1024 * 1024)
    requests = upload_requests("interrupted", data, chunk_bytes=64 * 1024, size_bytes=len(data))
    async with grpc.aio.insecure_channel(address) as channel:
        call = registry_pb2_grpc.ModelRegistryStub(channel).UploadVersion(metadata=ALICE.metadata())
        for request in requests[:5]:
            await call.write(request)
        # the server holds a half-written upload now
        tmp_dir = home / "artifacts" / "tmp"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not any(tmp_dir.iterdir()):
            assert loop.time() < deadline, "the upload never reached the server"
            await asyncio.sleep(0.02)
        process.send_signal(stop_signal)
        assert await asyncio.wait_for(process.wait(), 30) in (0, -stop_signal)
        with pytest.raises(grpc.aio.AioRpcError):
            await call

    # a killed registry cannot remove its address file
    address_file(home, "registry").unlink(missing_ok=True)
    restarted = await _start_registry(env)
    try:
        address = await _wait_for_address(home, restarted)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = registry_pb2_grpc.ModelRegistryStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetModel(
                    pb.GetModelRequest(name="interrupted"), metadata=ALICE.metadata(), timeout=10
                )
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert list((home / "artifacts" / "tmp").iterdir()) == []
        assert list((home / "artifacts" / "sha256").iterdir()) == []
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(restarted.wait(), 30) == 0


MESH = frozenset(
    f"scoremesh-{name}" for name in ("registry", "scoring", "training", "training-worker", "gateway")
)


async def _trace(
    home: Path, trace_id: str, complete: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """The trace's spans from the local store, once ``complete`` holds for them (spans arrive
    from several processes, each exporting in batches)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        code, out, err = await run_cli({"SCOREMESH_HOME": str(home)}, "traces", trace_id, "--json")
        spans: list[dict[str, Any]] = json.loads(out) if code == 0 else []
        if spans and complete(spans):
            return spans
        assert time.monotonic() < deadline, (code, out, err)
        await asyncio.sleep(0.2)


async def test_scoremesh_up_starts_the_mesh_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("SCOREMESH_DATABASE_URL", "DATABASE_URL") and not key.startswith("OTEL_")
    }
    env.update(
        {
            # spans leave each service within 0.2 s rather than the default 5 s
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "SCOREMESH_HOME": str(home),
            "SCOREMESH_REGISTRY_PORT": "0",
            "SCOREMESH_SCORING_PORT": "0",
            "SCOREMESH_GATEWAY_PORT": "0",
            "SCOREMESH_GATEWAY_GRPC_PORT": "0",
            "SCOREMESH_TRAINING_PORT": "0",
            "SCOREMESH_LOG_FORMAT": "text",
        }
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "up", env=env, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    try:
        banner = []
        while True:
            line = (await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT_S)).decode()
            assert line, f"scoremesh up exited early with {await process.wait()}"
            banner.append(line)
            if line.startswith("Ctrl-C"):
                break
        assert any(line.startswith("scoremesh is up") for line in banner), banner
        # the first start prints the new admin key (the gateway does, before the banner)
        assert any(line.startswith("admin key (shown once") for line in banner), banner
        address = address_file(home, "registry").read_text().strip()
        assert any(address in line for line in banner)

        model = tmp_path / "m.onnx"
        model.write_bytes(onnx_factory.tiny_classifier())
        code, out, err = await run_cli(
            {"SCOREMESH_REGISTRY_ADDR": address, **env}, "models", "push", "up-model", str(model), "--json"
        )
        assert code == 0, err
        assert json.loads(out)["status"] == "READY"

        # the gateway serves it over REST to the admin key up created (mode 0600)
        admin_key = home / "admin.key"
        assert stat.S_IMODE(admin_key.stat().st_mode) == 0o600
        gateway = address_file(home, "gateway").read_text().strip()
        assert any(gateway in line for line in banner)
        headers = {"Authorization": f"Bearer {admin_key.read_text().strip()}"}
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{gateway}/v1/models/up-model", headers=headers) as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["latestVersion"] == "1"
            async with http.get(f"http://{gateway}/v1/models/up-model") as response:
                assert response.status == 401
            # /v2 reaches scoring with the mesh's internal token (its channel has no interceptors)
            async with http.get(f"http://{gateway}/v2/health/ready") as response:
                assert response.status == 200
            row = {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 0]}
            async with http.post(
                f"http://{gateway}/v2/models/up-model/versions/1/infer",
                json={"inputs": [row]},
                headers=headers,
            ) as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["model_version"] == "1"
                trace_id = response.headers["X-Trace-Id"]
        # that request is one trace: gateway → scoring → batch → backend → Triton
        spans = await _trace(home, trace_id, lambda spans: any(s["service"] not in MESH for s in spans))
        by_id = {span["span_id"]: span for span in spans}

        def parent(span: dict[str, Any]) -> dict[str, Any]:
            return by_id[span["parent_span_id"]]

        [gateway_span] = [s for s in spans if s["service"] == "scoremesh-gateway"]
        [infer] = [s for s in spans if s["name"] == "/inference.GRPCInferenceService/ModelInfer"]
        [batch] = [s for s in spans if s["name"] == "batch"]
        [backend] = [s for s in spans if s["name"].startswith("backend ")]
        assert not gateway_span["parent_span_id"]
        assert parent(infer) is gateway_span
        assert infer["service"] == "scoremesh-scoring"
        assert parent(batch)["span_id"] in (
            infer["span_id"],
            *(s["span_id"] for s in spans if s["name"] == "cache"),
        )
        assert batch["attributes"]["scoremesh.batch_size"] == 1
        assert any(
            link["span_id"] == batch["parent_span_id"] or link["span_id"] == infer["span_id"]
            for link in batch["links"]
        )
        assert parent(backend) is batch
        assert backend["attributes"]["scoremesh.backend"] == "triton"
        triton = [s for s in spans if s["service"] not in MESH]
        assert any(s["parent_span_id"] == backend["span_id"] for s in triton), triton
        # an upload is a registry trace with its PostgreSQL queries
        code, out, err = await run_cli(env, "traces", "--service", "registry", "--json", "--limit", "100")
        assert code == 0, err
        uploads = [t for t in json.loads(out) if t["root_name"].endswith("/UploadVersion")]
        assert uploads, out
        upload = await _trace(home, uploads[0]["trace_id"], lambda spans: True)
        assert any(s["attributes"].get("db.system") == "postgresql" for s in upload)
        # every service serves Prometheus metrics on a port it announces
        async with aiohttp.ClientSession() as http:
            for name in ("registry", "scoring", "training", "gateway-admin", "training-worker"):
                metrics_address = address_file(home, f"{name}-metrics").read_text().strip()
                async with http.get(f"http://{metrics_address}/metrics") as response:
                    assert response.status == 200, name
                    text = await response.text()
                    assert "scoremesh_rpc_requests_total" in text or name == "training-worker", name
            registry_metrics = address_file(home, "registry-metrics").read_text().strip()
            async with http.get(f"http://{registry_metrics}/metrics") as response:
                assert 'method="UploadVersion"' in await response.text()
        # the CLI manages keys through the gateway's Admin service with the token up made
        admin = address_file(home, "gateway-admin").read_text().strip()
        assert any(admin in line for line in banner)
        code, out, err = await run_cli(
            {**env, "SCOREMESH_GATEWAY_ADMIN_ADDR": admin}, "keys", "list", "--json"
        )
        assert code == 0, err
        assert [key["tenant"] for key in json.loads(out)] == ["default"]
        # the training service and its worker are up: a job runs through to its version
        training = address_file(home, "training").read_text().strip()
        assert any(line.strip() == "training-worker" for line in banner), banner
        code, out, err = await run_cli(
            {**env, "SCOREMESH_TRAINING_ADDR": training},
            "train",
            "submit",
            "sklearn-tabular",
            "--arg",
            "dataset=iris",
            "--model",
            "up-trained",
            "--json",
        )
        assert code == 0, err
        job = json.loads(out)["id"]
        code, out, err = await run_cli({**env, "SCOREMESH_TRAINING_ADDR": training}, "train", "watch", job)
        assert code == 0, (out, err)
        assert "SUCCEEDED version 1" in out
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 60) == 0
        # the private cluster was stopped with everything else
        cluster = EmbeddedPostgres(home / "postgres")
        assert (cluster.data_dir / "PG_VERSION").is_file()
        assert not (cluster.data_dir / "postmaster.pid").exists()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        # as root the data may live outside tmp_path (see services.mesh.postgres)
        EmbeddedPostgres(home / "postgres").destroy()
