"""The training service end to end: a real PostgreSQL queue, real worker processes running
plugins in child processes, and a real registry receiving what they train."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from scoremesh.registry.v1 import registry_pb2 as registry_pb
from scoremesh.training.v1 import training_pb2 as pb

from services.mesh.server import address_file
from services.mesh.status import from_rpc_error
from services.registry.client import RegistryClient
from services.training.main import dataset_store
from tests.integration.cli_harness import run_cli
from tests.integration.registry_harness import RunningRegistry, error_details, registry_env, running_registry
from tests.integration.training_harness import (
    ACME,
    GLOBEX,
    PLUGINS_FIXTURE,
    RunningTraining,
    running_training,
    training_env,
    wait_for_state,
    worker_process,
)

pytestmark = pytest.mark.integration

FINISHED = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)


@dataclass
class Mesh:
    registry: RunningRegistry
    training: RunningTraining
    database_url: str

    @property
    def env(self) -> dict[str, str]:
        return self.training.env


@pytest.fixture
async def mesh(database_url: str, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with running_registry(registry_env(tmp_path / "registry", database_url)) as registry:
        env = training_env(tmp_path / "training", database_url, registry.address)
        async with running_training(env) as training:
            yield Mesh(registry, training, database_url)


async def _versions(mesh: Mesh, model: str) -> list[int]:
    """The model's versions; none when the model was never created."""
    try:
        versions = await RegistryClient(mesh.registry.channel, ACME).list_versions(model)
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return []
    return [v.version for v in versions]


async def _status(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_a_job_runs_registers_and_promotes(mesh: Mesh) -> None:
    client = mesh.training.client()
    job = await client.submit(
        "noop", {"sleep_s": 0}, model="trained", alias="production", promote_if="accuracy >= 0.5"
    )
    assert job.state == pb.QUEUED
    async with worker_process(mesh.env):
        events = [event async for event in client.watch(job.id)]
    states = [pb.JobState.Name(e.state.state) for e in events if e.WhichOneof("event") == "state"]
    assert states == ["QUEUED", "RUNNING", "SUCCEEDED"]
    done = await client.get(job.id)
    assert (done.state, done.version, done.promoted, done.attempts) == (pb.SUCCEEDED, 1, True, 1)
    assert done.metrics["accuracy"] >= 0.5
    # the version, its card and the alias are in the registry
    registry = RegistryClient(mesh.registry.channel, ACME)
    assert [a.version for a in await registry.list_aliases("trained") if a.alias == "production"] == [1]
    card = await registry.stub.GetModelCard(
        registry_pb.GetModelCardRequest(model="trained", version=1), metadata=ACME.metadata()
    )
    assert card.metrics["accuracy"] == done.metrics["accuracy"]
    # watching again from a known event resumes after it
    resumed = [e.sequence async for e in client.watch(job.id, after_event=events[0].sequence)]
    assert resumed == [e.sequence for e in events[1:]]


async def test_a_gate_that_does_not_hold_registers_without_promoting(mesh: Mesh) -> None:
    client = mesh.training.client()
    job = await client.submit("noop", {}, model="gated", alias="production", promote_if="accuracy > 2")
    async with worker_process(mesh.env):
        done = await wait_for_state(client, job.id, *FINISHED)
    assert (done.state, done.version, done.promoted) == (pb.SUCCEEDED, 1, False)
    assert await RegistryClient(mesh.registry.channel, ACME).list_aliases("gated") == []


async def test_a_killed_worker_s_job_is_retried_and_registered_once(mesh: Mesh) -> None:
    client = mesh.training.client()
    job = await client.submit("noop", {"sleep_s": 3}, model="survivor")
    async with worker_process(mesh.env) as doomed:
        await wait_for_state(client, job.id, pb.RUNNING)
        doomed.send_signal(signal.SIGKILL)
        await doomed.wait()
    # the lease (3 s) runs out; another worker takes the job over
    async with worker_process(mesh.env):
        done = await wait_for_state(client, job.id, *FINISHED, timeout_s=90)
    assert (done.state, done.attempts) == (pb.SUCCEEDED, 2)
    assert await _versions(mesh, "survivor") == [1]


async def test_two_workers_never_run_one_job(mesh: Mesh) -> None:
    client = mesh.training.client()
    jobs = [await client.submit("noop", {}, model=f"many-{i % 3}") for i in range(12)]
    async with (
        worker_process(mesh.env, SCOREMESH_TRAINING_WORKER_CONCURRENCY="2"),
        worker_process(mesh.env, SCOREMESH_TRAINING_WORKER_CONCURRENCY="2"),
    ):
        done = [await wait_for_state(client, j.id, *FINISHED, timeout_s=120) for j in jobs]
    assert {d.state for d in done} == {pb.SUCCEEDED}
    assert {d.attempts for d in done} == {1}
    conn = await asyncpg.connect(mesh.database_url)
    try:
        starts = await conn.fetch(
            """SELECT job_id, count(*) AS n FROM job_events
               WHERE kind = 'state' AND data->>'state' = 'RUNNING' GROUP BY job_id"""
        )
    finally:
        await conn.close()
    assert len(starts) == 12
    assert {row["n"] for row in starts} == {1}


async def test_cancel_stops_a_queued_job_at_once_and_a_running_one_soon(mesh: Mesh) -> None:
    client = mesh.training.client()
    queued = await client.submit("noop", {}, model="never")
    cancelled = await client.cancel(queued.id)
    assert cancelled.state == pb.CANCELLED
    running = await client.submit("noop", {"sleep_s": 60}, model="stopped")
    async with worker_process(mesh.env):
        await wait_for_state(client, running.id, pb.RUNNING)
        assert (await client.cancel(running.id)).state == pb.RUNNING  # asked; the worker stops it
        done = await wait_for_state(client, running.id, *FINISHED, timeout_s=20)
    assert done.state == pb.CANCELLED
    assert await _versions(mesh, "stopped") == []
    # cancelling a finished job changes nothing
    assert (await client.cancel(running.id)).state == pb.CANCELLED


async def test_a_plugin_over_its_time_limit_fails_with_the_reason(mesh: Mesh) -> None:
    client = mesh.training.client()
    job = await client.submit("noop", {"sleep_s": 60}, model="slow", time_limit_s=1)
    async with worker_process(mesh.env):
        done = await wait_for_state(client, job.id, *FINISHED, timeout_s=30)
    assert done.state == pb.FAILED
    assert "time limit of 1 s" in done.error
    assert done.attempts == 1  # a plugin's own failure is not retried


async def test_a_failing_plugin_fails_the_job_with_its_message(mesh: Mesh) -> None:
    client = mesh.training.client()
    job = await client.submit("noop", {"fail": True}, model="broken")
    async with worker_process(mesh.env):
        done = await wait_for_state(client, job.id, *FINISHED)
    assert done.state == pb.FAILED
    assert done.error
    assert await _versions(mesh, "broken") == []


async def test_bad_submissions_name_every_violation(mesh: Mesh) -> None:
    client = mesh.training.client()
    error = await _status(
        client.submit(
            "noop",
            {"sleep_s": "soon", "colour": "red"},
            model="no spaces",
            promote_if="accuracy is good",
            dataset="missing",
            max_attempts=-1,
            time_limit_s=10**6,
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, fields = error_details(error)
    assert set(fields) >= {
        "arguments.sleep_s",
        "arguments.colour",
        "registration.model",
        "registration.promote_if",
        "registration.alias",
        "dataset",
        "max_attempts",
        "time_limit_s",
    }
    error = await _status(client.submit("no-such-plugin", {}, model="m"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert from_rpc_error(error).reason == "PLUGIN_NOT_FOUND"
    error = await _status(client.submit("noop", {}))
    assert error_details(error)[1] == ["registration.model"]
    assert await client.jobs() == []


async def test_an_idempotency_key_returns_the_first_job(mesh: Mesh) -> None:
    client = mesh.training.client()
    first = await client.submit("noop", {"sleep_s": 0.5}, model="once", idempotency_key="nightly-1")
    again = await client.submit("noop", {"sleep_s": "0.5"}, model="once", idempotency_key="nightly-1")
    assert again.id == first.id
    error = await _status(client.submit("noop", {"sleep_s": 2}, model="once", idempotency_key="nightly-1"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    # keys are per tenant
    other = await mesh.training.client(GLOBEX).submit("noop", {}, model="once", idempotency_key="nightly-1")
    assert other.id != first.id


async def test_tenants_see_only_their_jobs(mesh: Mesh) -> None:
    job = await mesh.training.client().submit("noop", {}, model="private")
    stranger = mesh.training.client(GLOBEX)
    for call in (stranger.get(job.id), stranger.cancel(job.id), stranger.get("not-a-uuid")):
        assert (await _status(call)).code() == grpc.StatusCode.NOT_FOUND
    watching = stranger.watch(job.id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await anext(watching)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert await stranger.jobs() == []
    assert [j.id for j in await mesh.training.client().jobs()] == [job.id]


async def test_datasets_upload_once_per_name_and_bad_files_are_refused(mesh: Mesh, tmp_path: Path) -> None:
    client = mesh.training.client()
    good = tmp_path / "table.csv"
    good.write_text("a,b,label\n1,2,0\n3,4,1\n5,6,0\n")
    dataset = await client.push_dataset("table", good)
    assert (dataset.rows, dataset.columns, dataset.format, dataset.source) == (3, 2, "csv", "upload")
    assert (await client.push_dataset("table", good)).sha256 == dataset.sha256
    other = tmp_path / "other.csv"
    other.write_text("a,b,label\n1,2,1\n")
    assert (await _status(client.push_dataset("table", other))).code() == grpc.StatusCode.ALREADY_EXISTS
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,label\n1,x,0\n")
    error = await _status(client.push_dataset("bad", bad))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = await _status(client.push_dataset("../up", good))
    assert error_details(error)[1] == ["metadata.name"]
    assert [d.name for d in await client.datasets()] == ["table"]
    assert await mesh.training.client(GLOBEX).datasets() == []


async def test_a_job_trains_on_an_uploaded_dataset(mesh: Mesh, tmp_path: Path) -> None:
    client = mesh.training.client()
    rows = ["x1,x2,label"] + [f"{i % 7},{(i * 3) % 5},{int(i % 7 > 3)}" for i in range(60)]
    table = tmp_path / "rows.csv"
    table.write_text("\n".join(rows) + "\n")
    await client.push_dataset("rows", table)
    job = await client.submit(
        "sklearn-tabular", {"model": "logistic_regression"}, dataset="rows", model="tabular"
    )
    async with worker_process(mesh.env):
        done = await wait_for_state(client, job.id, *FINISHED, timeout_s=120)
    assert done.state == pb.SUCCEEDED, done.error
    assert done.metrics["accuracy"] > 0.5
    assert await _versions(mesh, "tabular") == [1]


async def test_a_worker_stopped_with_sigterm_puts_its_job_back(mesh: Mesh) -> None:
    client = mesh.training.client()
    job = await client.submit("noop", {"sleep_s": 60}, model="requeued", max_attempts=5)
    async with worker_process(mesh.env) as worker:
        await wait_for_state(client, job.id, pb.RUNNING)
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 20) == 0
    back = await client.get(job.id)
    assert back.state == pb.QUEUED
    assert "stopped" in back.error


async def test_the_cli_submits_watches_lists_and_cancels(mesh: Mesh, tmp_path: Path) -> None:
    env = {
        "SCOREMESH_TRAINING_ADDR": mesh.training.address,
        "SCOREMESH_TENANT": ACME.tenant,
        "SCOREMESH_PRINCIPAL": "carol",
    }
    table = tmp_path / "t.csv"
    table.write_text("a,label\n1,0\n2,1\n")
    code, out, err = await run_cli(env, "datasets", "push", "t", str(table), "--json")
    assert code == 0, err
    assert json.loads(out)["rows"] == "2"
    code, out, err = await run_cli(env, "datasets", "list")
    assert (code, out.splitlines()[1].split()[0]) == (0, "t"), err
    code, out, err = await run_cli(env, "train", "plugins")
    assert code == 0, err
    assert "--arg sleep_s=<float>" in out

    submit = ("train", "submit", "noop", "--model", "cli")
    code, out, err = await run_cli(env, *submit, "--arg", "sleep_s=0", "--json")
    assert code == 0, err
    good = json.loads(out)["id"]
    code, out, err = await run_cli(env, *submit, "--arg", "fail=true")
    assert code == 0, err
    bad = out.split()[1]
    async with worker_process(mesh.env):
        code, out, _ = await run_cli(env, "train", "watch", good)
        assert code == 0
        assert out.splitlines()[-1].startswith("SUCCEEDED version 1")
        code, out, _ = await run_cli(env, "train", "watch", bad)
        assert code == 1
        assert out.splitlines()[-1].startswith("FAILED")
    code, out, err = await run_cli(env, "train", "list", "--state", "succeeded", "--json")
    assert [job["id"] for job in json.loads(out)] == [good], err
    queued = (await mesh.training.client().submit("noop", {}, model="cli")).id
    code, out, err = await run_cli(env, "train", "cancel", queued)
    assert (code, out.strip()) == (0, f"job {queued} CANCELLED"), err
    code, out, _ = await run_cli(env, "train", "watch", queued)
    assert code == 1

    # failures: one line on stderr, non-zero exit
    code, out, err = await run_cli(env, "train", "submit", "noop", "--arg", "sleep_s=later", "--model", "cli")
    assert code == 1
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "sleep_s" in err
    code, _, err = await run_cli(env, "train", "submit", "noop", "--arg", "nonsense")
    assert code != 0
    assert len(err.strip().splitlines()) == 1


async def test_a_retry_after_registration_returns_the_version_already_registered(
    mesh: Mesh, tmp_path: Path
) -> None:
    """The worst moment to die: after the model was registered, before the job said so."""
    client = mesh.training.client()
    job = await client.submit("noop", {}, model="exactly-once")
    # a first attempt trains, keeps its model, registers it, and dies before finishing
    workdir = tmp_path / "attempt-1"
    workdir.mkdir()
    spec = workdir / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "plugin": "noop",
                "arguments": {},
                "dataset": None,
                "base_model": None,
                "workdir": str(workdir),
                "seed": 1,
                "plugins_dir": str(PLUGINS_FIXTURE),
            }
        )
    )
    runner = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.training.runner", str(spec), stdout=asyncio.subprocess.DEVNULL
    )
    assert await asyncio.wait_for(runner.wait(), 120) == 0
    jobs = mesh.training.training.jobs
    assert await jobs.claim("doomed", 1.0) is not None
    _, files = dataset_store(mesh.training.settings, jobs)
    async with files.upload() as upload:
        await upload.write((workdir / "model.onnx").read_bytes())
        sha256 = await upload.commit()
    await jobs.save_artifact(job.id, "doomed", sha256, {"accuracy": 1.0})
    pushed = await RegistryClient(mesh.registry.channel, ACME).push("exactly-once", workdir / "model.onnx")
    assert (pushed.created, pushed.version.version) == (True, 1)
    # the next attempt registers those same bytes: the registry answers with version 1
    async with worker_process(mesh.env):
        done = await wait_for_state(client, job.id, *FINISHED, timeout_s=60)
    assert (done.state, done.version, done.attempts) == (pb.SUCCEEDED, 1, 2)
    assert await _versions(mesh, "exactly-once") == [1]


async def test_a_worker_answers_health_checks_on_its_health_port(mesh: Mesh) -> None:
    # kubelet probes the worker there: it has no gRPC service of its own
    home = Path(mesh.env["SCOREMESH_HOME"])
    announced = address_file(home, "training-worker-health")
    async with worker_process(mesh.env, SCOREMESH_HEALTH_PORT="0") as worker:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not announced.exists():
            assert worker.returncode is None, "the worker exited"
            assert loop.time() < deadline, "the worker did not announce its health port"
            await asyncio.sleep(0.02)
        async with grpc.aio.insecure_channel(announced.read_text().strip()) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            # it serves health alone
            stub = channel.unary_unary("/scoremesh.training.v1.Training/ListJobs", None, None)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub(b"", timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), 30) == 0
    assert not announced.exists()
