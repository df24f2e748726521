"""Training benchmark: how soon an idle worker starts a job, how many no-op jobs one and two
workers get through, and where the time of a job goes.

Three measurements, in one run, of the ``noop`` test plugin (``tests/plugins_fixture``, which
sleeps ``sleep_s`` — 0 here — and writes a trivial ONNX model):

* **where a job's time goes**: the plugin child process the worker starts for every job
  (``python -m services.training.runner``), run here directly ``--startup-runs`` times beside a
  bare interpreter, a bare import of the runner and that import plus finding the plugin; the
  runner's own timeline from its stdout (start-up until its first event, the plugin, exit);
  its heaviest imports from ``-X importtime``; whether the plugin writes the same bytes every
  time (then every no-op job of one model registers one version, verified once); and what
  pushing those bytes to the registry costs, first (verified) and again;
* **submit → running with an idle worker**: ``--latency-jobs`` jobs one at a time, each
  submitted ``--idle-gap-s`` after the previous one finished (so the one worker is waiting on
  LISTEN). Measured on the database's clocks, ``create_time`` (insert) to ``start_time``
  (claim), and on the client's, from the SubmitJob call to the RUNNING event on WatchJob;
* **throughput**: ``--jobs`` jobs submitted at once (``--submit-concurrency`` SubmitJob calls in
  flight) to 1 and then 2 workers, waited for by polling ListJobs; jobs/s from the first
  ``create_time`` to the last ``end_time``; every job must have SUCCEEDED at its first attempt
  and the model must have exactly one version. Around each, the CPU of the worker processes
  (their own, and their reaped plugin processes'), the training service, PostgreSQL, the
  registry, this process and everything else on the machine, from /proc.

Run with ``make bench`` (or ``.venv/bin/python -m bench.training``). A private PostgreSQL (or
``SCOREMESH_DATABASE_URL``) backs a registry and the training service, which bind 127.0.0.1 on
ports the OS picks; workers run as ``scoremesh serve training-worker``; every loop is bounded in
count and time; every process started here is ended by its pid. Results are printed and
written to ``bench/results/training.json``; bench/README.md records them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Final

from google.protobuf.timestamp_pb2 import Timestamp
from scoremesh.training.v1 import training_pb2 as pb

from bench.common import (
    CLOCK_TICKS,
    Service,
    bounded_load,
    cpu_delta,
    cpu_snapshot,
    machine_ticks,
    percentile,
    postmaster_pid,
    reaped_cpu_snapshot,
    service_process,
    stop_process,
)
from services.mesh.channels import open_channel
from services.mesh.children import CODE_ROOT, child_env
from services.mesh.identity import Caller
from services.mesh.postgres import database, resolve_database_url
from services.mesh.settings import MeshSettings
from services.registry.client import RegistryClient
from services.training.client import TrainingClient
from services.training.plugins import find_plugin, validate_arguments

RESULTS: Final = Path(__file__).parent / "results" / "training.json"
PLUGINS_DIR: Final = Path(__file__).resolve().parent.parent / "tests" / "plugins_fixture"
PLUGIN: Final = "noop"
ARGUMENTS: Final[Mapping[str, Any]] = {"sleep_s": 0.0}
CALLER: Final = Caller(tenant="bench", principal="bench")
LATENCY_GOAL_MS: Final = 50.0
"""The issue's goal: p50 of submit → running (database clocks) with an idle worker."""
CALL_TIMEOUT_S: Final = 30.0
JOB_TIMEOUT_S: Final = 120.0
"""The longest one latency job (or warm-up job) may take from submission to its end."""
CHILD_TIMEOUT_S: Final = 120.0
POLL_INTERVAL_S: Final = 0.25
DRAIN_TIMEOUT_S: Final = 120.0
"""After the time limit: how long running jobs may take to end once the queue is cancelled."""
LATENCY_WARMUP_JOBS: Final = 3
WARMUP_SLEEP_S: Final = 1.0
"""The warm-up jobs' sleep_s: long enough that every worker holds one at the same time."""
WARMUP_ROUNDS: Final = 5
REGISTER_PUSHES: Final = 10
TOP_IMPORTS: Final = 8
ROLES: Final = ("worker", "runner", "training", "postgres", "registry")
"""Whose CPU the throughput runs report: the worker processes themselves, the plugin
processes they ran (reaped, so counted from the workers' cutime), and the servers' trees."""
FINISHED: Final = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)


@dataclass(frozen=True)
class Limits:
    jobs: int
    latency_jobs: int
    workers: Sequence[int]
    submit_concurrency: int
    time_limit_s: float
    """Upper bound on each phase: the latency jobs, and each throughput run (submit + wait)."""
    idle_gap_s: float
    startup_runs: int


@dataclass(frozen=True)
class ChildTiming:
    """One command run ``runs`` times as the worker runs the plugin process."""

    what: str
    runs: int
    wall_ms_p50: float
    wall_ms_max: float
    cpu_ms_p50: float


@dataclass(frozen=True)
class Startup:
    timings: list[ChildTiming]
    runner_phases_ms_p50: dict[str, float]
    top_imports_ms: dict[str, float]
    """The runner's heaviest outermost imports (cumulative, from one ``-X importtime`` run)."""
    model_bytes: int
    runs: int
    distinct_models: int
    """How many different ONNX files the ``runs`` runs wrote (1: the plugin is deterministic)."""
    register_ms: dict[str, float]
    """Pushing the plugin's model to the registry: the first push (verification) and the
    median of later pushes of the same bytes (the registry answers with its version)."""


@dataclass(frozen=True)
class Latency:
    jobs: int
    """Jobs that ran (latency is theirs); the runs are those that succeeded."""
    failed: dict[str, int]
    """Why jobs that ran did not succeed, and how many."""
    never_ran: int
    server_ms: dict[str, float]
    """create_time → start_time (database clocks): p50, p99, max."""
    client_ms: dict[str, float]
    """SubmitJob called → RUNNING seen on WatchJob: p50, p99, max."""
    submit_ms: dict[str, float]
    """The SubmitJob call alone: p50, p99, max."""
    run_ms: dict[str, float]
    """start_time → end_time: p50, p99, max."""
    phases_ms_p50: dict[str, float]
    """Medians of the stretches between a job's events (event times, database clocks)."""
    met: bool
    other_cpu_pct: float
    steal_pct: float


@dataclass(frozen=True)
class Throughput:
    workers: int
    jobs: int
    finished: int
    complete: bool
    """Every job ended within the time limit."""
    succeeded: int
    first_attempt: int
    """Jobs that ended SUCCEEDED at attempts == 1."""
    failed: dict[str, int]
    """Why jobs did not succeed, and how many."""
    versions: int
    submit_s: float
    seconds: float
    """First create_time → last end_time (database clocks)."""
    jobs_per_s: float
    run_ms_p50: float
    """start_time → end_time of a job."""
    busy_pct: float
    """Sum of the jobs' run times / (workers * seconds): how much of the time a worker held a job."""
    cpu_ms_per_job: dict[str, float]
    client_cpu_ms_per_job: float
    other_cpu_pct: float
    steal_pct: float
    load_1m: float

    @property
    def total_cpu_ms_per_job(self) -> float:
        return round(sum(self.cpu_ms_per_job.values()) + self.client_cpu_ms_per_job, 1)


def summary_ms(samples: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max of ``samples`` (seconds) in ms."""
    return {
        "p50": round(statistics.median(samples) * 1000, 1),
        "p99": round(percentile(list(samples), 0.99) * 1000, 1),
        "max": round(max(samples) * 1000, 1),
    }


def seconds_of(stamp: Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9


# the plugin process on its own


@dataclass(frozen=True)
class ChildRun:
    wall_s: float
    cpu_s: float
    lines_s: list[float]
    """When each line of its stdout arrived, in seconds from the start."""
    stderr: bytes


async def timed_child(argv: Sequence[str], env: Mapping[str, str]) -> ChildRun:
    """Runs ``argv`` as the worker runs a plugin (its environment, the code root as working
    directory, no ``preexec_fn``). Nothing else of this process ends meanwhile, so the growth
    of RUSAGE_CHILDREN is this child's CPU."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=dict(env),
        cwd=CODE_ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    stdout, stderr = process.stdout, process.stderr
    lines: list[float] = []

    async def read_lines() -> None:
        while await stdout.readline():
            lines.append(time.perf_counter() - started)

    try:
        async with asyncio.timeout(CHILD_TIMEOUT_S):
            _, errors, _ = await asyncio.gather(read_lines(), stderr.read(), process.wait())
    finally:
        await asyncio.shield(stop_process(process))
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {process.returncode}: {errors[-2000:]!r}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return ChildRun(wall, cpu, lines, errors)


def runner_spec(workdir: Path, seed: int) -> dict[str, Any]:
    """What the worker writes to spec.json for a noop job (see ``Worker._train``)."""
    plugin = find_plugin(PLUGIN, PLUGINS_DIR)
    if plugin is None:
        raise RuntimeError(f"no plugin {PLUGIN!r} in {PLUGINS_DIR}")
    return {
        "plugin": PLUGIN,
        "arguments": validate_arguments(plugin.info, ARGUMENTS),
        "dataset": None,
        "base_model": None,
        "workdir": os.fspath(workdir),
        "seed": seed,
        "plugins_dir": os.fspath(PLUGINS_DIR),
    }


def top_imports(importtime: bytes, count: int) -> dict[str, float]:
    """The ``count`` heaviest outermost imports in ``-X importtime`` output (cumulative ms;
    an import made while another module was being imported counts in that one)."""
    totals: dict[str, float] = {}
    line_format = re.compile(r"import time:\s+\d+ \|\s+(\d+) \| ( *)(\S+)")
    for line in importtime.decode("utf-8", "replace").splitlines():
        match = line_format.match(line)
        if match is not None and not match.group(2):
            totals[match.group(3)] = totals.get(match.group(3), 0.0) + int(match.group(1)) / 1000
    heaviest = sorted(totals.items(), key=lambda item: -item[1])[:count]
    return {name: round(ms, 1) for name, ms in heaviest}


def _runner_phases(run: ChildRun) -> dict[str, float]:
    """The runner's stdout is its events, the result line last: start-up until the plugin's
    first event, the plugin (here: importing onnx, building and writing the model), exit."""
    if not run.lines_s:
        return {}
    return {
        "start -> first event": run.lines_s[0],
        "first event -> result line": run.lines_s[-1] - run.lines_s[0],
        "result line -> exit": run.wall_s - run.lines_s[-1],
    }


async def measure_startup(workdir: Path, runs: int) -> tuple[Startup, bytes]:
    """Times the plugin process and its parts; returns them with the model it wrote."""
    env = child_env(threads=None)
    python = sys.executable
    find = f"r.find_plugin({PLUGIN!r}, pathlib.Path({os.fspath(PLUGINS_DIR)!r}))"
    commands = {
        "python -c pass": [python, "-c", "pass"],
        "import services.training.runner": [python, "-c", "import services.training.runner"],
        f"... and find the {PLUGIN} plugin": [
            python,
            "-c",
            f"import pathlib, services.training.runner as r; {find}",
        ],
    }
    timings = []
    for what, argv in commands.items():
        timings.append(_timing(what, [await timed_child(argv, env) for _ in range(runs)]))
    models: list[bytes] = []
    runner_runs: list[ChildRun] = []
    imports: dict[str, float] = {}
    for index in range(runs + 1):
        job_dir = workdir / f"runner-{index}"
        job_dir.mkdir()
        spec = job_dir / "spec.json"
        spec.write_text(json.dumps(runner_spec(job_dir, seed=index * 7919)))
        importtime = index == runs  # one more run, whose timing is not the runner's
        argv = [python, *(["-X", "importtime"] if importtime else []), "-m", "services.training.runner"]
        run = await timed_child([*argv, os.fspath(spec)], env)
        models.append((job_dir / "model.onnx").read_bytes())
        if importtime:
            imports = top_imports(run.stderr, TOP_IMPORTS)
        else:
            runner_runs.append(run)
    timings.append(_timing(f"runner, {PLUGIN} plugin (sleep_s 0)", runner_runs))
    phases = [_runner_phases(run) for run in runner_runs]
    startup = Startup(
        timings=timings,
        runner_phases_ms_p50={
            name: round(statistics.median(p[name] for p in phases if name in p) * 1000, 1)
            for name in dict.fromkeys(name for p in phases for name in p)
        },
        top_imports_ms=imports,
        model_bytes=len(models[0]),
        runs=len(models),
        distinct_models=len({hashlib.sha256(model).hexdigest() for model in models}),
        register_ms={},
    )
    return startup, models[0]


def _timing(what: str, runs: Sequence[ChildRun]) -> ChildTiming:
    walls = [run.wall_s for run in runs]
    return ChildTiming(
        what=what,
        runs=len(runs),
        wall_ms_p50=round(statistics.median(walls) * 1000, 1),
        wall_ms_max=round(max(walls) * 1000, 1),
        cpu_ms_p50=round(statistics.median(run.cpu_s for run in runs) * 1000, 1),
    )


# the mesh


@dataclass
class Mesh:
    postgres: int | None
    registry: Service
    training: Service
    worker_env: dict[str, str]
    jobs: TrainingClient
    models: RegistryClient


@contextlib.asynccontextmanager
async def open_mesh(workdir: Path) -> AsyncIterator[Mesh]:
    """PostgreSQL, a registry and the training service, each until the block ends."""
    token = secrets.token_urlsafe(32)
    shared = {"SCOREMESH_INTERNAL_TOKEN": token}
    async with database(resolve_database_url(os.environ), workdir) as database_url:
        postgres = await postmaster_pid(database_url)
        registry_env = {**shared, "SCOREMESH_DATABASE_URL": database_url, "SCOREMESH_REGISTRY_PORT": "0"}
        async with service_process("registry", workdir / "registry", registry_env) as registry:
            training_env = {
                **shared,
                "SCOREMESH_DATABASE_URL": database_url,
                "SCOREMESH_TRAINING_PORT": "0",
                "SCOREMESH_REGISTRY_ADDR": registry.address,
                "SCOREMESH_TRAINING_STORE": os.fspath(workdir / "store"),
                "SCOREMESH_TRAINING_PLUGINS_DIR": os.fspath(PLUGINS_DIR),
            }
            async with service_process("training", workdir / "training", training_env) as training:
                worker_env = {
                    **os.environ,
                    "SCOREMESH_HOME": os.fspath(workdir / "workers"),
                    "SCOREMESH_LOG_LEVEL": "WARNING",
                    **training_env,
                }
                settings = MeshSettings.from_env(shared)
                async with (
                    open_channel(training.address, settings) as training_channel,
                    open_channel(registry.address, settings) as registry_channel,
                ):
                    yield Mesh(
                        postgres,
                        registry,
                        training,
                        worker_env,
                        TrainingClient(training_channel, CALLER),
                        RegistryClient(registry_channel, CALLER),
                    )


class Workers:
    """Training worker processes (``scoremesh serve training-worker``), each ended by its pid."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = dict(env)
        self._processes: list[asyncio.subprocess.Process] = []

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    async def grow_to(self, count: int) -> None:
        while len(self._processes) < count:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "services.cli",
                "serve",
                "training-worker",
                env=self._env,
                stdin=asyncio.subprocess.DEVNULL,
            )
            self._processes.append(process)

    def check_alive(self) -> None:
        for process in self._processes:
            if process.returncode is not None:
                raise RuntimeError(f"training worker {process.pid} exited with {process.returncode}")

    async def stop(self) -> None:
        await asyncio.gather(*(stop_process(process) for process in self._processes))


@contextlib.asynccontextmanager
async def workers(env: Mapping[str, str]) -> AsyncIterator[Workers]:
    started = Workers(env)
    try:
        yield started
    finally:
        await asyncio.shield(started.stop())


# waiting for jobs


async def job_list(
    client: TrainingClient, state: int = pb.JOB_STATE_UNSPECIFIED, limit: int = 10_000
) -> list[pb.Job]:
    """The caller's jobs in ``state`` (all: unspecified), newest first, at most ``limit``."""
    found: list[pb.Job] = []
    token = ""
    while len(found) < limit:
        page = await client.stub.ListJobs(
            pb.ListJobsRequest(state=state, page_size=1000, page_token=token),
            metadata=CALLER.metadata(),
            timeout=CALL_TIMEOUT_S,
        )
        found.extend(page.jobs)
        token = page.next_page_token
        if not token:
            break
    return found[:limit]


async def wait_for_jobs(
    client: TrainingClient, ids: Iterable[str], pool: Workers, timeout: float
) -> list[pb.Job]:
    """Polls each of a few jobs until all have ended; returns them."""
    deadline = time.monotonic() + timeout
    pending = list(ids)
    done: dict[str, pb.Job] = {}
    while pending:
        pool.check_alive()
        for job_id in pending:
            job = await client.get(job_id)
            if job.state in FINISHED:
                done[job_id] = job
        pending = [job_id for job_id in pending if job_id not in done]
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} job(s) did not end within {timeout} s")
        if pending:
            await asyncio.sleep(POLL_INTERVAL_S)
    return [done[job_id] for job_id in ids]


async def wait_until_idle(client: TrainingClient, pool: Workers, deadline: float) -> bool:
    """Polls until no job is queued or running (True) or ``deadline`` (monotonic) passes."""
    while True:
        pool.check_alive()
        queued = await client.jobs(pb.QUEUED, page_size=1)
        running = await client.jobs(pb.RUNNING, page_size=1)
        if not queued and not running:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(POLL_INTERVAL_S)


async def warm_up(client: TrainingClient, pool: Workers, model: str) -> None:
    """Jobs until every worker has held one at the same time: the workers are up, have their
    connections, and the model's first version (the one verification) exists."""
    count = len(pool.pids)
    failures: list[str] = []
    for _ in range(WARMUP_ROUNDS):
        ids = [
            (await client.submit(PLUGIN, {"sleep_s": WARMUP_SLEEP_S}, model=model)).id for _ in range(count)
        ]
        jobs = await wait_for_jobs(client, ids, pool, JOB_TIMEOUT_S)
        failed = [job for job in jobs if job.state != pb.SUCCEEDED]
        failures += [f"{pb.JobState.Name(job.state)}: {job.error}" for job in failed]
        if failed:
            print(f"warm-up: a job ended {failures[-1]}", flush=True)
        elif max(seconds_of(job.start_time) for job in jobs) < min(seconds_of(job.end_time) for job in jobs):
            return
    raise RuntimeError(
        f"{count} worker(s) never ran {count} job(s) at once and to success ({failures or 'not all started'})"
    )


# CPU accounting


def _roles(mesh: Mesh, pool: Workers) -> dict[str, list[int]]:
    return {
        "worker": pool.pids,
        "training": [mesh.training.pid],
        "postgres": [] if mesh.postgres is None else [mesh.postgres],
        "registry": [mesh.registry.pid],
    }


_Snapshot = dict[str, tuple[dict[int, float], dict[int, float]]]


def _cpu(roles: Mapping[str, list[int]]) -> _Snapshot:
    return {role: (cpu_snapshot(pids), reaped_cpu_snapshot(pids)) for role, pids in roles.items()}


@dataclass(frozen=True)
class Usage:
    seconds: float
    cpu_s: dict[str, float]
    """CPU seconds by role in ROLES (the workers' reaped children are the plugin runs)."""
    client_cpu_s: float
    other_cpu_pct: float
    """CPU of every other process on the machine, in % of the machine (2 cores: 100% = both)."""
    steal_pct: float


class Meter:
    """What every process used between its start and :meth:`read`, from /proc: the roles'
    trees, this process, and the rest of the machine (other work on a shared machine)."""

    def __init__(self, roles: Mapping[str, list[int]]) -> None:
        self._roles = dict(roles)
        self._cpu = _cpu(roles)
        self._ticks = machine_ticks()
        self._client = time.process_time()
        self._started = time.monotonic()

    def read(self) -> Usage:
        client = time.process_time() - self._client
        ticks = machine_ticks()
        after = _cpu(self._roles)
        elapsed = time.monotonic() - self._started
        used: dict[str, float] = {}
        for role, (own, reaped) in after.items():
            own_used = cpu_delta(self._cpu[role][0], own)
            reaped_used = cpu_delta(self._cpu[role][1], reaped)
            if role == "worker":
                used["worker"], used["runner"] = own_used, reaped_used
            else:
                used[role] = own_used + reaped_used
        busy = (ticks.busy - self._ticks.busy) / CLOCK_TICKS
        others = max(0.0, busy - sum(used.values()) - client)
        return Usage(
            seconds=elapsed,
            cpu_s=used,
            client_cpu_s=client,
            other_cpu_pct=round(100 * others / (elapsed * (os.cpu_count() or 1)), 1),
            steal_pct=round(
                100 * (ticks.steal - self._ticks.steal) / max(1, ticks.total - self._ticks.total), 1
            ),
        )


# submit → running


@dataclass(frozen=True)
class _Sample:
    server_s: float
    client_s: float
    submit_s: float
    run_s: float
    phases_s: dict[str, float]
    error: str
    """Why the job did not succeed; empty when it did."""


def _phases(job: pb.Job, events: Sequence[pb.JobEvent]) -> dict[str, float]:
    """The stretches of a job between its events: queued → RUNNING event, RUNNING → the
    plugin's first event, the plugin's events, its last event → the end state, all on the
    database's clocks."""
    states = {
        event.state.state: seconds_of(event.time) for event in events if event.WhichOneof("event") == "state"
    }
    plugin = [seconds_of(event.time) for event in events if event.WhichOneof("event") != "state"]
    running, ended = states.get(pb.RUNNING), states.get(job.state)
    if running is None or ended is None:
        return {}
    phases = {
        "create_time -> RUNNING event": running - seconds_of(job.create_time),
        "RUNNING -> end event": ended - running,
    }
    if plugin:
        phases["RUNNING -> first plugin event"] = plugin[0] - running
        phases["first -> last plugin event"] = plugin[-1] - plugin[0]
        phases["last plugin event -> end event"] = ended - plugin[-1]
    return phases


async def latency_job(client: TrainingClient, model: str) -> _Sample | None:
    """One job, submitted and watched to its end; None if it never ran."""
    started = time.perf_counter()
    job = await client.submit(PLUGIN, ARGUMENTS, model=model)
    submitted = time.perf_counter()
    running_seen: float | None = None
    events: list[pb.JobEvent] = []
    async with asyncio.timeout(JOB_TIMEOUT_S):
        async for event in client.watch(job.id):
            events.append(event)
            if (
                running_seen is None
                and event.WhichOneof("event") == "state"
                and event.state.state == pb.RUNNING
            ):
                running_seen = time.perf_counter()
    done = await client.get(job.id)
    if running_seen is None or not done.HasField("start_time"):
        return None
    succeeded = done.state == pb.SUCCEEDED
    return _Sample(
        server_s=seconds_of(done.start_time) - seconds_of(done.create_time),
        client_s=running_seen - started,
        submit_s=submitted - started,
        run_s=seconds_of(done.end_time) - seconds_of(done.start_time),
        phases_s=_phases(done, events) if succeeded else {},
        error="" if succeeded else f"{pb.JobState.Name(done.state)}: {done.error}",
    )


async def measure_latency(mesh: Mesh, pool: Workers, limits: Limits) -> Latency:
    client = mesh.jobs
    model = "bench-noop-latency"
    meter = Meter(_roles(mesh, pool))
    deadline = time.monotonic() + limits.time_limit_s
    samples: list[_Sample] = []
    never_ran = 0
    for index in range(LATENCY_WARMUP_JOBS + limits.latency_jobs):
        if time.monotonic() > deadline:
            break
        pool.check_alive()
        # the worker finished the previous job: let it get back to waiting on LISTEN
        await asyncio.sleep(limits.idle_gap_s)
        sample = await latency_job(client, model)
        if index < LATENCY_WARMUP_JOBS:
            continue
        if sample is None:
            never_ran += 1
        else:
            samples.append(sample)
    usage = meter.read()
    succeeded = [sample for sample in samples if not sample.error]
    if not succeeded:
        raise RuntimeError("no latency job succeeded within the time limit")
    phase_names = {name for sample in succeeded for name in sample.phases_s}
    server = summary_ms([s.server_s for s in samples])
    return Latency(
        jobs=len(samples),
        failed=dict(Counter(sample.error for sample in samples if sample.error)),
        never_ran=never_ran,
        server_ms=server,
        client_ms=summary_ms([s.client_s for s in samples]),
        submit_ms=summary_ms([s.submit_s for s in samples]),
        run_ms=summary_ms([s.run_s for s in succeeded]),
        phases_ms_p50={
            name: round(
                statistics.median(s.phases_s[name] for s in succeeded if name in s.phases_s) * 1000, 1
            )
            for name in sorted(phase_names)
        },
        met=server["p50"] <= LATENCY_GOAL_MS,
        other_cpu_pct=usage.other_cpu_pct,
        steal_pct=usage.steal_pct,
    )


# throughput


async def drain(client: TrainingClient, pool: Workers) -> None:
    """Cancels every queued job and waits (bounded) for the running ones, so that the next
    run starts from an empty queue."""
    for job in await job_list(client, pb.QUEUED):
        await client.cancel(job.id)
    await wait_until_idle(client, pool, time.monotonic() + DRAIN_TIMEOUT_S)


async def measure_throughput(mesh: Mesh, pool: Workers, limits: Limits) -> Throughput:
    client = mesh.jobs
    count = len(pool.pids)
    model = f"bench-noop-w{count}"
    await warm_up(client, pool, model)
    meter = Meter(_roles(mesh, pool))
    started = time.monotonic()
    deadline = started + limits.time_limit_s
    ids: list[str] = []

    async def submit(_: int) -> None:
        ids.append((await client.submit(PLUGIN, ARGUMENTS, model=model)).id)

    await bounded_load(submit, limits.submit_concurrency, limits.jobs, limits.time_limit_s)
    submit_s = time.monotonic() - started
    complete = len(ids) == limits.jobs and await wait_until_idle(client, pool, deadline)
    usage = meter.read()
    if not complete:
        await drain(client, pool)
    wanted = set(ids)
    jobs = [job for job in await job_list(client, limit=len(ids) + 100) if job.id in wanted]
    # the jobs that ran to their end (not those the drain cancelled in the queue)
    ended = [job for job in jobs if job.HasField("start_time") and job.HasField("end_time")]
    if not ended:
        raise RuntimeError(f"none of the {len(ids)} jobs ended within {limits.time_limit_s} s")
    first = min(seconds_of(job.create_time) for job in jobs)
    last = max(seconds_of(job.end_time) for job in ended)
    runs = [seconds_of(job.end_time) - seconds_of(job.start_time) for job in ended]
    return Throughput(
        workers=count,
        jobs=len(ids),
        finished=len(ended),
        complete=complete,
        succeeded=sum(job.state == pb.SUCCEEDED for job in jobs),
        first_attempt=sum(job.state == pb.SUCCEEDED and job.attempts == 1 for job in jobs),
        failed=dict(
            Counter(
                f"{pb.JobState.Name(job.state)}: {job.error}" for job in jobs if job.state != pb.SUCCEEDED
            )
        ),
        versions=len(await mesh.models.list_versions(model)),
        submit_s=round(submit_s, 2),
        seconds=round(last - first, 2),
        jobs_per_s=round(len(ended) / (last - first), 2),
        run_ms_p50=round(statistics.median(runs) * 1000, 1),
        busy_pct=round(100 * sum(runs) / (count * (last - first)), 1),
        cpu_ms_per_job={role: round(usage.cpu_s[role] / len(ended) * 1000, 1) for role in ROLES},
        client_cpu_ms_per_job=round(usage.client_cpu_s / len(ended) * 1000, 1),
        other_cpu_pct=usage.other_cpu_pct,
        steal_pct=usage.steal_pct,
        load_1m=round(os.getloadavg()[0], 2),
    )


async def measure_register(models: RegistryClient, onnx: bytes, workdir: Path) -> dict[str, float]:
    """What registering a no-op job's model costs: the first push (verified) and pushes of
    the same bytes again (answered with the version the registry has)."""
    path = workdir / "noop.onnx"
    path.write_bytes(onnx)
    walls = []
    for _ in range(1 + REGISTER_PUSHES):
        started = time.perf_counter()
        await models.push("bench-noop-register", path, timeout=CALL_TIMEOUT_S * 4)
        walls.append(time.perf_counter() - started)
    return {
        "first push (verified)": round(walls[0] * 1000, 1),
        "same bytes again, p50": round(statistics.median(walls[1:]) * 1000, 1),
    }


# the run


async def bench(workdir: Path, limits: Limits) -> tuple[Startup, Latency, list[Throughput]]:
    startup, model = await measure_startup(workdir, limits.startup_runs)
    async with open_mesh(workdir) as mesh, workers(mesh.worker_env) as pool:
        startup = replace(startup, register_ms=await measure_register(mesh.models, model, workdir))
        print_startup(startup)
        await pool.grow_to(1)
        await warm_up(mesh.jobs, pool, "bench-noop-latency")
        latency = await measure_latency(mesh, pool, limits)
        print_latency(latency)
        throughputs = []
        print(THROUGHPUT_HEADER, flush=True)
        for count in sorted(set(limits.workers)):
            await pool.grow_to(count)
            throughput = await measure_throughput(mesh, pool, limits)
            print(format_throughput(throughput), flush=True)
            throughputs.append(throughput)
    return startup, latency, throughputs


# reporting


def print_startup(startup: Startup) -> None:
    print(f"{'plugin process start-up':<42} {'wall p50 ms':>11} {'wall max':>9} {'CPU p50 ms':>10}")
    for timing in startup.timings:
        walls = f"{timing.wall_ms_p50:>11.1f} {timing.wall_ms_max:>9.1f}"
        print(f"{timing.what:<42} {walls} {timing.cpu_ms_p50:>10.1f}")
    for what, table in {
        "the runner's p50 (ms)": startup.runner_phases_ms_p50,
        "its heaviest imports (ms)": startup.top_imports_ms,
        "registering its model (ms)": startup.register_ms,
    }.items():
        print(f"{what}:", ", ".join(f"{name} {ms:.1f}" for name, ms in table.items()))
    print(
        f"{PLUGIN} model: {startup.model_bytes} bytes; {startup.distinct_models} distinct file(s)"
        f" in {startup.runs} runs",
        flush=True,
    )


def print_latency(latency: Latency) -> None:
    print(f"submit -> running, idle worker ({latency.jobs} jobs)   {'p50':>7} {'p99':>7} {'max':>7}")
    rows = {
        "database: create_time -> start_time": latency.server_ms,
        "client: SubmitJob -> RUNNING on WatchJob": latency.client_ms,
        "client: the SubmitJob call": latency.submit_ms,
        "job run: start_time -> end_time": latency.run_ms,
    }
    for what, ms in rows.items():
        print(f"{what:<45} {ms['p50']:>7.1f} {ms['p99']:>7.1f} {ms['max']:>7.1f}")
    for name, median in latency.phases_ms_p50.items():
        print(f"  p50 {name}: {median} ms")
    if latency.failed or latency.never_ran:
        print(f"  jobs that did not succeed: {latency.failed}; never ran: {latency.never_ran}")
    print(f"  others: {latency.other_cpu_pct}% of the machine, steal {latency.steal_pct}%")
    verdict = "met" if latency.met else "NOT met"
    print(f"goal: p50 <= {LATENCY_GOAL_MS:.0f} ms (database clocks): {verdict}", flush=True)


THROUGHPUT_HEADER: Final = (
    f"{'workers':>7} {'jobs':>5} {'ended':>5} {'jobs/s':>6} {'submit s':>8} {'run p50 ms':>10} {'busy %':>6} "
    + " ".join(f"{role + ' ms':>11}" for role in ROLES)
    + f" {'client ms':>9} {'total ms':>8} {'others %':>8} {'steal %':>7}"
    + f" {'ok':>5} {'1st try':>7} {'versions':>8}"
)


def format_throughput(run: Throughput) -> str:
    return (
        f"{run.workers:>7} {run.jobs:>5} {run.finished:>5} {run.jobs_per_s:>6.2f} {run.submit_s:>8.1f}"
        f" {run.run_ms_p50:>10.1f} {run.busy_pct:>6.1f} "
        + " ".join(f"{run.cpu_ms_per_job[role]:>11.1f}" for role in ROLES)
        + f" {run.client_cpu_ms_per_job:>9.1f} {run.total_cpu_ms_per_job:>8.1f} {run.other_cpu_pct:>8.1f}"
        f" {run.steal_pct:>7.1f} {run.succeeded:>5} {run.first_attempt:>7} {run.versions:>8}"
    )


async def main_async(limits: Limits) -> dict[str, Any]:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="scoremesh-bench-") as tmp:
        startup, latency, throughputs = await bench(Path(tmp), limits)
    checks = {
        f"w{run.workers}": run.complete
        and run.succeeded == run.first_attempt == run.jobs == limits.jobs
        and run.versions == 1
        for run in throughputs
    }
    print("checks (all jobs SUCCEEDED at attempt 1, one version):", checks)
    for run in throughputs:
        if run.failed:
            print(f"  {run.workers} worker(s), jobs that did not succeed: {run.failed}")
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_before": [round(load, 2) for load in load_before],
        "load_after": [round(load, 2) for load in os.getloadavg()],
        "limits": asdict(limits),
        "plugin": f"{PLUGIN} {dict(ARGUMENTS)} from {PLUGINS_DIR.relative_to(CODE_ROOT)}",
        "startup": asdict(startup),
        "latency": asdict(latency),
        "throughput": [
            {**asdict(run), "total_cpu_ms_per_job": run.total_cpu_ms_per_job} for run in throughputs
        ],
        "checks": checks,
        "goals": {"latency_p50_ms": LATENCY_GOAL_MS, "latency_met": latency.met},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per throughput run")
    parser.add_argument("--latency-jobs", type=int, default=100, help="jobs for submit -> running")
    parser.add_argument(
        "--workers", nargs="+", type=int, default=[1, 2], help="worker processes per throughput run"
    )
    parser.add_argument("--submit-concurrency", type=int, default=16, help="SubmitJob calls in flight")
    parser.add_argument(
        "--time-limit-s",
        type=float,
        default=1800.0,
        help="upper bound on the latency run and on each throughput run",
    )
    parser.add_argument("--idle-gap-s", type=float, default=0.1, help="pause between latency jobs")
    parser.add_argument("--startup-runs", type=int, default=10, help="runs of each start-up command")
    args = parser.parse_args()
    limits = Limits(
        jobs=args.jobs,
        latency_jobs=args.latency_jobs,
        workers=args.workers,
        submit_concurrency=args.submit_concurrency,
        time_limit_s=args.time_limit_s,
        idle_gap_s=args.idle_gap_s,
        startup_runs=args.startup_runs,
    )
    results = asyncio.run(main_async(limits))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
