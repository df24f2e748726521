"""The training service built by the production factory on 127.0.0.1:0 beside a registry, and
training workers as real processes (``scoremesh serve training-worker``), each ended by its pid."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from scoremesh.training.v1 import training_pb2 as pb

from services.mesh.channels import open_channel
from services.mesh.identity import Caller
from services.training.client import TrainingClient
from services.training.main import Training, build_training
from services.training.settings import TrainingSettings

PLUGINS_FIXTURE = Path(__file__).resolve().parent.parent / "plugins_fixture"
ACME = Caller(tenant="acme", principal="alice")
GLOBEX = Caller(tenant="globex", principal="bob")
STOP_TIMEOUT_S = 15.0


@dataclass
class RunningTraining:
    training: Training
    settings: TrainingSettings
    channel: grpc.aio.Channel
    address: str
    env: dict[str, str]

    def client(self, caller: Caller = ACME) -> TrainingClient:
        return TrainingClient(self.channel, caller)


def training_env(home: Path, database_url: str, registry_address: str, **overrides: str) -> dict[str, str]:
    return {
        "SCOREMESH_HOME": str(home),
        "SCOREMESH_DATABASE_URL": database_url,
        "SCOREMESH_TRAINING_PORT": "0",
        "SCOREMESH_REGISTRY_ADDR": registry_address,
        "SCOREMESH_TRAINING_PLUGINS_DIR": str(PLUGINS_FIXTURE),
        "SCOREMESH_TRAINING_LEASE_S": "3",
        "SCOREMESH_LOG_FORMAT": "text",
        **overrides,
    }


@contextlib.asynccontextmanager
async def running_training(
    env: Mapping[str, str], scoring: grpc.aio.Channel | None = None
) -> AsyncIterator[RunningTraining]:
    settings = TrainingSettings.from_env(env)
    assert settings.database_url
    training = await build_training(settings, settings.database_url, scoring)
    try:
        port = await training.server.start()
        address = f"127.0.0.1:{port}"
        async with open_channel(address, settings.mesh) as channel:
            yield RunningTraining(training, settings, channel, address, dict(env))
    finally:
        await training.server.stop(0)
        await training.close()


@contextlib.asynccontextmanager
async def worker_process(
    env: Mapping[str, str], **overrides: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A training worker process; SIGTERM (then SIGKILL) by its pid on exit, unless the test
    killed it already."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "serve",
        "training-worker",
        env={**os.environ, **env, **overrides},
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        await stop_process(process)


async def stop_process(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def wait_for_state(
    client: TrainingClient, job_id: str, *states: int, timeout_s: float = 60.0
) -> pb.Job:
    """Polls the job until it is in one of ``states``; returns it."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = await client.get(job_id)
        if job.state in states:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(
                f"job {job_id} is {job.state} ({job.error}), not in {states}, after {timeout_s} s"
            )
        await asyncio.sleep(0.05)
