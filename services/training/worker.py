"""A training worker: claims jobs from the queue, runs each plugin in a child process with
time and memory limits, and registers the model the plugin produced.

Each of ``concurrency`` slots loops: claim the oldest claimable job, or sleep until the queue
announces one (LISTEN/NOTIFY) or a dead worker's lease is due. While a job runs, a heartbeat
renews its lease every third of it and hears of cancels. The plugin's stdout is a stream of
JSON events (progress, metric, log, then result or error) that become job events.

Exactly one version per job: the trained model is kept in the training store and recorded on
the job before registration, so a retry after a crash registers those same bytes, and the
registry returns the version it already has for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
import grpc.aio
from google.protobuf import struct_pb2
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, SpanKind
from scoremesh.registry.v1 import registry_pb2 as registry_pb

from services.mesh import metrics
from services.mesh.artifacts import LocalArtifactStore
from services.mesh.children import CODE_ROOT, child_env, limit_env
from services.mesh.identity import Caller
from services.mesh.notify import EventListener
from services.mesh.status import describe
from services.registry.client import Reference, RegistryClient
from services.training.conditions import Condition
from services.training.datasets import DatasetStore
from services.training.jobs import Job, JobState, JobStore, LeaseLost, Outcome

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

IDLE_RECHECK_S: Final = 60.0
"""The longest an idle slot sleeps without a notification: a safety net, not the way work is found."""
KILL_WAIT_S: Final = 5.0
CLAIM_RETRY_S: Final = 1.0
MAX_EVENT_LINE_BYTES: Final = 64 * 1024
STDERR_TAIL_BYTES: Final = 4096
_TRANSIENT: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_EVENT_KINDS: Final = frozenset({"progress", "metric", "log"})


@dataclass
class _Run:
    """What one attempt's plugin process said."""

    result: dict[str, Any] | None = None
    error: str | None = None
    stderr_tail: bytes = b""
    returncode: int | None = None


@dataclass
class _Watch:
    """Set by the heartbeat: the job was cancelled, or is no longer ours."""

    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    lost: asyncio.Event = field(default_factory=asyncio.Event)


class _Stop(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.error)
        self.outcome = outcome


class Worker:
    def __init__(
        self,
        jobs: JobStore,
        datasets: DatasetStore,
        files: LocalArtifactStore,
        queue: EventListener,
        registry: grpc.aio.Channel,
        *,
        concurrency: int,
        lease_s: float,
        memory_bytes: int,
        plugins_dir: Path | None,
        work_dir: Path,
    ) -> None:
        self._jobs = jobs
        self._datasets = datasets
        self._files = files
        self._queue = queue
        self._registry = registry
        self._concurrency = concurrency
        self._lease_s = lease_s
        self._memory_bytes = memory_bytes
        self._plugins_dir = plugins_dir
        self._work_dir = work_dir
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"

    async def run(self, stop: asyncio.Event) -> None:
        """Runs the slots until ``stop`` is set; a job running then is stopped and put back
        in the queue."""
        self._work_dir.mkdir(parents=True, exist_ok=True)
        slots = [
            asyncio.create_task(self._slot(f"{self.name}/{i}", stop), name=f"training-slot-{i}")
            for i in range(self._concurrency)
        ]
        log.info("training worker %s running %d slot(s)", self.name, self._concurrency)
        try:
            await asyncio.gather(*slots)
        finally:
            for slot in slots:
                slot.cancel()
            await asyncio.gather(*slots, return_exceptions=True)

    async def _slot(self, owner: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            # read before claiming: a job queued after the claim found nothing is announced
            # beyond this cursor, so the wait below cannot miss it
            cursor = self._queue.latest
            try:
                job = await self._jobs.claim(owner, self._lease_s)
            except Exception as error:  # the database is away: wait a little, then try again
                log.warning("claiming a job failed: %s", error)
                await _first(asyncio.sleep(CLAIM_RETRY_S), stop.wait())
                continue
            if job is not None:
                await self.run_job(job, owner, stop)
                continue
            try:
                due = await self._jobs.next_lease_expiry_s()
            except Exception:
                due = None
            timeout = IDLE_RECHECK_S if due is None else min(IDLE_RECHECK_S, due + 0.05)
            await _first(self._queue.wait_beyond(cursor, timeout), stop.wait())

    async def run_job(self, job: Job, owner: str, stop: asyncio.Event) -> None:
        """One attempt at ``job``, which ``owner`` has claimed."""
        with _job_span(job):
            await self._run_job(job, owner, stop)

    async def _run_job(self, job: Job, owner: str, stop: asyncio.Event) -> None:
        started = time.monotonic()
        watch = _Watch()
        heartbeat = asyncio.create_task(self._heartbeat(job, owner, watch), name=f"heartbeat-{job.id}")
        log.info("job %s (%s) attempt %d started by %s", job.id, job.plugin, job.attempts, owner)
        try:
            outcome = await self._attempt(job, owner, watch, stop)
        except LeaseLost:
            log.warning("job %s: lease lost; leaving it to whoever holds it now", job.id)
            return
        except _Stop as stopped:
            outcome = stopped.outcome
        except Exception:
            # the database or the store failed us: once the lease runs out, the job is tried
            # again (registering what this attempt saved, if it got that far)
            log.exception("job %s: attempt %d broke off", job.id, job.attempts)
            return
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        try:
            finished = await self._jobs.finish(job.id, owner, outcome)
            log.info("job %s ended %s %s", job.id, finished.state.value, finished.error)
            metrics.JOB_SECONDS.labels(job.plugin, finished.state.value).observe(time.monotonic() - started)
        except LeaseLost:
            log.warning("job %s: lease lost before its end was recorded", job.id)
        except Exception:
            # the lease runs out and the job is tried again, registering the same bytes
            log.exception("job %s: recording its end failed", job.id)

    async def _attempt(self, job: Job, owner: str, watch: _Watch, stop: asyncio.Event) -> Outcome:
        sha256 = job.artifact_sha256
        scores = dict(job.metrics)
        if sha256 is None or not self._files.path_of(sha256).is_file():
            workdir = Path(tempfile.mkdtemp(prefix=f"{job.id}-", dir=self._work_dir))
            try:
                with _tracer.start_as_current_span("plugin run", attributes={"scoremesh.plugin": job.plugin}):
                    run = await self._train(job, owner, workdir, watch, stop)
                scores.update({k: float(v) for k, v in (run.result or {}).get("metrics", {}).items()})
                sha256 = await self._keep(workdir / "model.onnx")
            finally:
                await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)
            await self._jobs.save_artifact(job.id, owner, sha256, scores)
        else:
            await self._jobs.report(
                job.id, owner, "log", {"message": "registering the model an earlier attempt trained"}
            )
        with _tracer.start_as_current_span(
            "register", attributes={"scoremesh.model": job.registration.model}
        ):
            return await self._register(job, owner, self._files.path_of(sha256), scores)

    async def _keep(self, model: Path) -> str:
        """Copies the trained model into the training store; returns its sha256."""
        async with self._files.upload() as upload:
            with model.open("rb") as source:
                while chunk := source.read(1 << 20):
                    await upload.write(chunk)
            return await upload.commit()

    # the plugin process

    async def _train(self, job: Job, owner: str, workdir: Path, watch: _Watch, stop: asyncio.Event) -> _Run:
        spec = {
            "plugin": job.plugin,
            "arguments": dict(job.arguments),
            "dataset": await self._dataset_spec(job),
            "base_model": await self._base_model(job, workdir),
            "workdir": os.fspath(workdir),
            "seed": uuid.UUID(job.id).int % (2**31),
            "plugins_dir": os.fspath(self._plugins_dir) if self._plugins_dir else None,
        }
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.training.runner",
            os.fspath(spec_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=child_env(threads=None, extra=limit_env(self._memory_bytes)),
            cwd=CODE_ROOT,
            start_new_session=True,
            limit=MAX_EVENT_LINE_BYTES,
        )
        run = _Run()
        reading = asyncio.create_task(self._read_events(process, job, owner, run))
        stopping = {
            "time": asyncio.ensure_future(asyncio.sleep(job.time_limit_s)),
            "cancel": asyncio.ensure_future(watch.cancelled.wait()),
            "lost": asyncio.ensure_future(watch.lost.wait()),
            "stop": asyncio.ensure_future(stop.wait()),
        }
        try:
            await asyncio.wait([reading, *stopping.values()], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in stopping.values():
                waiter.cancel()
            if not reading.done():
                _kill(process)
            run.returncode = await _reap(process)
            if not reading.done():
                reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
        if stopping["lost"].done() and not stopping["lost"].cancelled():
            raise LeaseLost(job.id)
        if reading.done() and not reading.cancelled() and reading.exception() is not None:
            raise reading.exception()  # type: ignore[misc]
        return self._judge(job, run, stopping)

    def _judge(self, job: Job, run: _Run, stopping: Mapping[str, asyncio.Future[Any]]) -> _Run:
        def fired(name: str) -> bool:
            return stopping[name].done() and not stopping[name].cancelled()

        if fired("cancel"):
            raise _Stop(Outcome(JobState.CANCELLED, "cancelled while running; the plugin was stopped"))
        if fired("stop"):
            raise _Stop(Outcome(JobState.QUEUED, "its worker was stopped; the job goes back to the queue"))
        if fired("time"):
            raise _Stop(
                Outcome(JobState.FAILED, f"the plugin exceeded its time limit of {job.time_limit_s} s")
            )
        if run.error is not None:
            raise _Stop(Outcome(JobState.FAILED, run.error))
        if run.returncode != 0 or run.result is None:
            raise _Stop(Outcome(JobState.FAILED, self._crash_reason(run)))
        return run

    def _crash_reason(self, run: _Run) -> str:
        stderr = run.stderr_tail.decode("utf-8", "replace")
        if "MemoryError" in stderr or "std::bad_alloc" in stderr or "Cannot allocate memory" in stderr:
            return f"the plugin exceeded its memory limit of {self._memory_bytes} bytes"
        code = run.returncode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"the plugin process was killed by {name}"
        last = stderr.strip().splitlines()[-1:] or ["no output"]
        return f"the plugin process exited with status {code} without a result: {last[0][:300]}"

    async def _read_events(
        self, process: asyncio.subprocess.Process, job: Job, owner: str, run: _Run
    ) -> None:
        assert process.stdout is not None
        assert process.stderr is not None
        stderr_task = asyncio.create_task(_tail(process.stderr, run))
        try:
            while True:
                try:
                    line = await process.stdout.readline()
                except ValueError:  # a line over the limit
                    run.error = f"the plugin wrote an event line longer than {MAX_EVENT_LINE_BYTES} bytes"
                    return
                if not line:
                    break
                await self._on_line(line, job, owner, run)
        finally:
            await stderr_task

    async def _on_line(self, line: bytes, job: Job, owner: str, run: _Run) -> None:
        try:
            event = json.loads(line)
            kind = event["type"]
        except (ValueError, KeyError, TypeError):
            await self._jobs.report(job.id, owner, "log", {"message": line.decode("utf-8", "replace")[:1000]})
            return
        if kind == "result":
            run.result = event
        elif kind == "error":
            run.error = str(event.get("message", "the plugin failed"))[:2000]
        elif kind in _EVENT_KINDS:
            data = {k: v for k, v in event.items() if k != "type"}
            if _valid(kind, data):
                await self._jobs.report(job.id, owner, kind, data)

    async def _dataset_spec(self, job: Job) -> dict[str, str] | None:
        if not job.dataset:
            return None
        dataset = await self._datasets.get(_caller(job), job.dataset)
        return {"path": os.fspath(self._datasets.path_of(dataset)), "format": dataset.format}

    async def _base_model(self, job: Job, workdir: Path) -> str | None:
        if not job.base_model:
            return None
        path = workdir / "base.onnx"
        try:
            await RegistryClient(self._registry, _caller(job)).pull(Reference.parse(job.base_model), path)
        except grpc.aio.AioRpcError as error:
            raise _Stop(_registry_outcome(f"reading the base model {job.base_model}", error)) from None
        return os.fspath(path)

    # registration

    async def _register(self, job: Job, owner: str, model: Path, metrics: dict[str, float]) -> Outcome:
        registration = job.registration
        client = RegistryClient(self._registry, _caller(job))
        try:
            pushed = await client.push(
                registration.model,
                model,
                description=f"trained by {job.plugin} {job.plugin_version}",
            )
            version = pushed.version
            if version.status != registry_pb.READY:
                failed = [f"{c.name}: {c.detail}" for c in version.verification.checks if not c.passed]
                return Outcome(
                    JobState.FAILED, "the registry refused the model: " + "; ".join(failed), metrics=metrics
                )
            card_metrics = struct_pb2.Struct()
            card_metrics.update(metrics)
            await client.stub.UpdateModelCard(
                registry_pb.UpdateModelCardRequest(
                    card=registry_pb.ModelCard(
                        model=version.model,
                        version=version.version,
                        metrics=card_metrics,
                        description=f"job {job.id}: {job.plugin} {job.plugin_version}",
                    )
                ),
                metadata=_caller(job).metadata(),
            )
            promoted = await self._promote(job, owner, client, version.version, metrics)
        except grpc.aio.AioRpcError as error:
            return _registry_outcome("registering the model", error, metrics)
        return Outcome(JobState.SUCCEEDED, version=version.version, promoted=promoted, metrics=metrics)

    async def _promote(
        self, job: Job, owner: str, client: RegistryClient, version: int, metrics: dict[str, float]
    ) -> bool:
        registration = job.registration
        if not registration.alias:
            return False
        if registration.promote_if:
            holds, why = Condition.parse(registration.promote_if).holds(metrics)
            await self._jobs.report(job.id, owner, "log", {"message": why})
            if not holds:
                return False
        await client.set_alias(registration.model, registration.alias, version)
        await self._jobs.report(
            job.id,
            owner,
            "log",
            {"message": f"{registration.model}@{registration.alias} -> version {version}"},
        )
        return True

    # the lease

    async def _heartbeat(self, job: Job, owner: str, watch: _Watch) -> None:
        interval = self._lease_s / 3
        while True:
            await asyncio.sleep(interval)
            try:
                if await self._jobs.heartbeat(job.id, owner, self._lease_s):
                    watch.cancelled.set()
            except LeaseLost:
                watch.lost.set()
                return
            except Exception as error:  # the lease may still be renewed before it runs out
                log.warning("job %s: heartbeat failed: %s", job.id, error)


@contextlib.contextmanager
def _job_span(job: Job) -> Iterator[trace.Span]:
    """A new trace per attempt, linked to the request that submitted the job (its
    traceparent was kept on the job): the attempt runs long after that request ended."""
    submitted = trace.get_current_span(propagate.extract({"traceparent": job.traceparent})).get_span_context()
    with _tracer.start_as_current_span(
        "training job",
        context=otel_context.Context(),
        kind=SpanKind.CONSUMER,
        links=[Link(submitted)] if submitted.is_valid else [],
        attributes={
            "scoremesh.job_id": job.id,
            "scoremesh.plugin": job.plugin,
            "scoremesh.model": job.registration.model,
            "scoremesh.attempt": job.attempts,
        },
    ) as span:
        yield span


def _caller(job: Job) -> Caller:
    return Caller(tenant=job.tenant, principal=f"training-job:{job.id}")


def _registry_outcome(
    doing: str, error: grpc.aio.AioRpcError, metrics: dict[str, float] | None = None
) -> Outcome:
    """A registry that is away is worth another attempt; anything else ends the job."""
    state = JobState.QUEUED if error.code() in _TRANSIENT else JobState.FAILED
    return Outcome(state, f"{doing} failed: {describe(error)}", metrics=metrics or {})


def _valid(kind: str, data: dict[str, Any]) -> bool:
    number = (int, float)
    if kind == "progress":
        return isinstance(data.get("fraction"), number) and isinstance(data.get("message", ""), str)
    if kind == "metric":
        return isinstance(data.get("name"), str) and isinstance(data.get("value"), number)
    return isinstance(data.get("message"), str)


async def _tail(stream: asyncio.StreamReader, run: _Run) -> None:
    tail = bytearray()
    while chunk := await stream.read(1 << 14):
        tail += chunk
        del tail[: max(0, len(tail) - STDERR_TAIL_BYTES)]
    run.stderr_tail = bytes(tail)


def _kill(process: asyncio.subprocess.Process) -> None:
    # the whole session: a plugin may have started processes of its own
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


async def _reap(process: asyncio.subprocess.Process) -> int:
    try:
        return await asyncio.wait_for(process.wait(), KILL_WAIT_S)
    except TimeoutError:
        _kill(process)
        return await process.wait()


async def _first(*waits: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
