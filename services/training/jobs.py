"""The training queue in PostgreSQL: jobs, their events, and the leases workers hold.

A job is QUEUED when submitted. A worker claims the oldest claimable job with ``SELECT … FOR
UPDATE SKIP LOCKED`` (two workers never get the same one) and holds it by a lease it renews
with heartbeats. A job whose lease expired (its worker died) is claimable again while it has
attempts left, and FAILED when it has none. Every write a worker makes is fenced by its
lease: a worker that lost its job (paused past its lease, say) changes nothing.

Every change is also a row in ``job_events`` (WatchJob streams them); submitting a job and
putting one back in the queue NOTIFY :data:`QUEUE_CHANNEL`, every event :data:`EVENTS_CHANNEL`,
both with the event id, so workers and watchers wait without polling.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import enum
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import asyncpg

from services.mesh import paging
from services.mesh.errors import FailedPrecondition, InvalidArgument, NotFound
from services.mesh.identity import Caller
from services.mesh.migrations import migrated_pool
from services.mesh.notify import EventListener
from services.mesh.postgres import translated_errors

log = logging.getLogger(__name__)

QUEUE_CHANNEL: Final = "scoremesh_training_queue"
EVENTS_CHANNEL: Final = "scoremesh_training_events"
_HEAD_QUERY: Final = "SELECT coalesce(max(id), 0) FROM job_events"


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True, slots=True)
class Registration:
    """Where a job's model goes: a version of ``model``; ``alias`` moves to it when
    ``promote_if`` holds (or is empty)."""

    model: str
    alias: str = ""
    promote_if: str = ""


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job as submitted, its arguments already validated against the plugin."""

    plugin: str
    plugin_version: str
    arguments: Mapping[str, Any]
    registration: Registration
    max_attempts: int
    time_limit_s: int
    dataset: str = ""
    base_model: str = ""
    idempotency_key: str = ""
    traceparent: str = ""


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    tenant: str
    created_by: str
    plugin: str
    plugin_version: str
    arguments: Mapping[str, Any]
    dataset: str
    base_model: str
    registration: Registration
    state: JobState
    attempts: int
    max_attempts: int
    time_limit_s: int
    progress: float
    progress_message: str
    metrics: Mapping[str, float]
    error: str
    version: int | None
    promoted: bool
    create_time: datetime
    start_time: datetime | None
    end_time: datetime | None
    idempotency_key: str
    traceparent: str
    artifact_sha256: str | None
    cancel_requested: bool
    lease_owner: str | None

    def same_request(self, new: NewJob) -> bool:
        """Whether ``new`` asks for what this job was submitted with (an idempotent retry)."""
        return (
            self.plugin == new.plugin
            and dict(self.arguments) == dict(new.arguments)
            and self.dataset == new.dataset
            and self.base_model == new.base_model
            and self.registration == new.registration
        )


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One row of ``job_events``. ``kind`` is state, progress, metric or log; ``data`` holds
    {state, detail, version} / {fraction, message} / {name, value, step} / {message}."""

    id: int
    job_id: str
    time: datetime
    kind: str
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class JobPage:
    jobs: tuple[Job, ...]
    next_page_token: str


@dataclass(slots=True)
class Outcome:
    """How an attempt ended, for :meth:`JobStore.finish`."""

    state: JobState
    error: str = ""
    version: int | None = None
    promoted: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


class LeaseLost(Exception):
    """The worker no longer holds the job: its lease expired and the job moved on."""


_COLUMNS: Final = """id::text, tenant, created_by, plugin, plugin_version, arguments, dataset,
    base_model, model, alias, promote_if, state, attempts, max_attempts, time_limit_s, progress,
    progress_message, metrics, error, version, promoted, create_time, start_time, end_time,
    coalesce(idempotency_key, '') AS idempotency_key, traceparent, artifact_sha256,
    cancel_requested, lease_owner"""


def _job(row: asyncpg.Record) -> Job:
    return Job(
        id=row["id"],
        tenant=row["tenant"],
        created_by=row["created_by"],
        plugin=row["plugin"],
        plugin_version=row["plugin_version"],
        arguments=json.loads(row["arguments"]),
        dataset=row["dataset"],
        base_model=row["base_model"],
        registration=Registration(row["model"], row["alias"], row["promote_if"]),
        state=JobState(row["state"]),
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        time_limit_s=row["time_limit_s"],
        progress=row["progress"],
        progress_message=row["progress_message"],
        metrics=json.loads(row["metrics"]),
        error=row["error"],
        version=row["version"],
        promoted=row["promoted"],
        create_time=row["create_time"],
        start_time=row["start_time"],
        end_time=row["end_time"],
        idempotency_key=row["idempotency_key"],
        traceparent=row["traceparent"],
        artifact_sha256=row["artifact_sha256"],
        cancel_requested=row["cancel_requested"],
        lease_owner=row["lease_owner"],
    )


def _event(row: asyncpg.Record) -> JobEvent:
    return JobEvent(row["id"], row["job_id"], row["time"], row["kind"], json.loads(row["data"]))


def _job_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise NotFound(f"no job {text!r}", reason="JOB_NOT_FOUND", metadata={"job": text[:64]}) from None


def _not_found(job_id: str) -> NotFound:
    return NotFound(f"no job {job_id!r}", reason="JOB_NOT_FOUND", metadata={"job": job_id})


def _encode_token(create_time: datetime, job_id: str) -> str:
    payload = json.dumps([create_time.isoformat(), job_id])
    return base64.urlsafe_b64encode(payload.encode()).decode()


def _decode_token(token: str) -> tuple[datetime, str]:
    try:
        created, job_id = json.loads(base64.b64decode(token.encode(), altchars=b"-_", validate=True))
        return datetime.fromisoformat(created), str(uuid.UUID(job_id))
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError) as error:
        raise InvalidArgument.for_field("page_token", "is not a token this service issued") from error


async def _add_event(conn: asyncpg.Connection, job_id: str, kind: str, data: Mapping[str, Any]) -> int:
    event_id: int = await conn.fetchval(
        "INSERT INTO job_events (job_id, kind, data) VALUES ($1, $2, $3) RETURNING id",
        uuid.UUID(job_id),
        kind,
        json.dumps(data),
    )
    await conn.execute("SELECT pg_notify($1, $2)", EVENTS_CHANNEL, str(event_id))
    return event_id


async def _state_event(
    conn: asyncpg.Connection, job_id: str, state: JobState, detail: str = "", version: int | None = None
) -> int:
    data: dict[str, Any] = {"state": state.value, "detail": detail}
    if version is not None:
        data["version"] = version
    event_id = await _add_event(conn, job_id, "state", data)
    if state is JobState.QUEUED:
        await conn.execute("SELECT pg_notify($1, $2)", QUEUE_CHANNEL, str(event_id))
    return event_id


class JobStore:
    """Jobs and their events. The servicer calls the tenant-scoped methods (they take a
    :class:`Caller`); workers call :meth:`claim` and the lease-fenced ones."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, dsn: str, *, min_size: int = 1, max_size: int = 4) -> JobStore:
        pool = await migrated_pool(
            dsn,
            component="training",
            package="services.training.migrations",
            min_size=min_size,
            max_size=max_size,
        )
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    @staticmethod
    def queue_listener(dsn: str) -> EventListener:
        """Wakes workers when a job is queued (or put back in the queue)."""
        return EventListener(dsn, QUEUE_CHANNEL, _HEAD_QUERY, name="training-queue")

    @staticmethod
    def events_listener(dsn: str) -> EventListener:
        """Wakes watchers on every job event."""
        return EventListener(dsn, EVENTS_CHANNEL, _HEAD_QUERY, name="training-events")

    # the API's side

    async def submit(self, caller: Caller, new: NewJob) -> tuple[Job, bool]:
        """Queues ``new`` for ``caller``'s tenant and returns it with True; with an
        idempotency key used before, returns that job with False (FAILED_PRECONDITION when it
        was submitted with a different request)."""
        job_id = str(uuid.uuid4())
        async with translated_errors(), self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"""INSERT INTO jobs (id, tenant, created_by, plugin, plugin_version, arguments,
                        dataset, base_model, model, alias, promote_if, idempotency_key,
                        traceparent, time_limit_s, state, max_attempts)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, 'QUEUED', $15)
                    ON CONFLICT (tenant, idempotency_key) DO NOTHING
                    RETURNING {_COLUMNS}""",
                uuid.UUID(job_id),
                caller.tenant,
                caller.principal,
                new.plugin,
                new.plugin_version,
                json.dumps(dict(new.arguments)),
                new.dataset,
                new.base_model,
                new.registration.model,
                new.registration.alias,
                new.registration.promote_if,
                new.idempotency_key or None,
                new.traceparent,
                new.time_limit_s,
                new.max_attempts,
            )
            if row is not None:
                await _state_event(conn, job_id, JobState.QUEUED)
                return _job(row), True
            existing = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM jobs WHERE tenant = $1 AND idempotency_key = $2",
                caller.tenant,
                new.idempotency_key,
            )
        job = _job(existing)
        if not job.same_request(new):
            raise FailedPrecondition(
                f"idempotency key {new.idempotency_key!r} was used for another request (job {job.id})",
                reason="IDEMPOTENCY_KEY_REUSED",
                metadata={"job": job.id},
            )
        return job, False

    async def get(self, caller: Caller, job_id: str) -> Job:
        """``caller``'s tenant's job; NOT_FOUND for another tenant's."""
        async with translated_errors():
            row = await self._pool.fetchrow(
                f"SELECT {_COLUMNS} FROM jobs WHERE id = $1 AND tenant = $2", _job_id(job_id), caller.tenant
            )
        if row is None:
            raise _not_found(job_id)
        return _job(row)

    async def list(
        self, caller: Caller, *, state: JobState | None = None, page_size: int = 0, page_token: str = ""
    ) -> JobPage:
        limit = paging.page_size(page_size)
        before = _decode_token(page_token) if page_token else None
        async with translated_errors():
            rows = await self._pool.fetch(
                f"""SELECT {_COLUMNS} FROM jobs
                    WHERE tenant = $1 AND ($2::text IS NULL OR state = $2)
                      AND ($3::timestamptz IS NULL OR (create_time, id) < ($3, $4::uuid))
                    ORDER BY create_time DESC, id DESC LIMIT $5""",
                caller.tenant,
                state.value if state else None,
                before[0] if before else None,
                before[1] if before else None,
                limit + 1,
            )
        jobs = tuple(_job(row) for row in rows[:limit])
        token = _encode_token(jobs[-1].create_time, jobs[-1].id) if len(rows) > limit else ""
        return JobPage(jobs, token)

    async def cancel(self, caller: Caller, job_id: str) -> Job:
        """A queued job is CANCELLED at once; a running one is marked, and its worker stops it
        at its next heartbeat; a finished one is returned unchanged."""
        async with translated_errors(), self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM jobs WHERE id = $1 AND tenant = $2 FOR UPDATE",
                _job_id(job_id),
                caller.tenant,
            )
            if row is None:
                raise _not_found(job_id)
            job = _job(row)
            if job.state is JobState.QUEUED:
                row = await conn.fetchrow(
                    f"""UPDATE jobs SET state = 'CANCELLED', end_time = now(),
                            error = 'cancelled by ' || $2, cancel_requested = true
                        WHERE id = $1 RETURNING {_COLUMNS}""",
                    uuid.UUID(job.id),
                    caller.principal,
                )
                await _state_event(conn, job.id, JobState.CANCELLED, f"cancelled by {caller.principal}")
            elif job.state is JobState.RUNNING and not job.cancel_requested:
                row = await conn.fetchrow(
                    f"UPDATE jobs SET cancel_requested = true WHERE id = $1 RETURNING {_COLUMNS}",
                    uuid.UUID(job.id),
                )
                await _add_event(conn, job.id, "log", {"message": f"cancel requested by {caller.principal}"})
        return _job(row)

    async def events_after(self, job_id: str, after: int, limit: int = 500) -> builtins.list[JobEvent]:
        async with translated_errors():
            rows = await self._pool.fetch(
                """SELECT id, job_id::text, time, kind, data FROM job_events
                   WHERE job_id = $1 AND id > $2 ORDER BY id LIMIT $3""",
                _job_id(job_id),
                after,
                limit,
            )
        return [_event(row) for row in rows]

    # the workers' side

    async def claim(self, owner: str, lease_s: float) -> Job | None:
        """The oldest claimable job, now RUNNING under ``owner``'s lease for ``lease_s``
        seconds, or None. Jobs whose worker died are settled first: FAILED when they have no
        attempt left, CANCELLED when a cancel was asked for."""
        async with translated_errors(), self._pool.acquire() as conn, conn.transaction():
            await self._settle_expired(conn)
            row = await conn.fetchrow(
                f"""UPDATE jobs SET state = 'RUNNING', attempts = attempts + 1, lease_owner = $1,
                        lease_expires = now() + make_interval(secs => $2), start_time = now(),
                        progress = 0, progress_message = ''
                    WHERE id = (
                        SELECT id FROM jobs
                        WHERE state = 'QUEUED'
                           OR (state = 'RUNNING' AND lease_expires < now() AND attempts < max_attempts
                               AND NOT cancel_requested)
                        ORDER BY create_time, id
                        FOR UPDATE SKIP LOCKED
                        LIMIT 1)
                    RETURNING {_COLUMNS}""",
                owner,
                lease_s,
            )
            if row is None:
                return None
            job = _job(row)
            await _state_event(
                conn, job.id, JobState.RUNNING, f"attempt {job.attempts} of {job.max_attempts}"
            )
        return job

    async def _settle_expired(self, conn: asyncpg.Connection) -> None:
        rows = await conn.fetch(
            """SELECT id::text, attempts, cancel_requested FROM jobs
               WHERE state = 'RUNNING' AND lease_expires < now()
                 AND (attempts >= max_attempts OR cancel_requested)
               FOR UPDATE SKIP LOCKED"""
        )
        for row in rows:
            if row["cancel_requested"]:
                state, detail = JobState.CANCELLED, "cancelled; its worker had stopped"
            else:
                state = JobState.FAILED
                detail = (
                    f"its worker stopped responding (lease expired) on attempt {row['attempts']}, the last"
                )
            await conn.execute(
                """UPDATE jobs SET state = $2, error = $3, end_time = now(), lease_owner = NULL
                   WHERE id = $1""",
                uuid.UUID(row["id"]),
                state.value,
                detail,
            )
            await _state_event(conn, row["id"], state, detail)

    async def next_lease_expiry_s(self) -> float | None:
        """Seconds until the earliest lease of a running job expires (0 when one has), or None
        when no job runs: how long an idle worker may sleep before a dead worker's job is due."""
        async with translated_errors():
            seconds: float | None = await self._pool.fetchval(
                """SELECT greatest(extract(epoch FROM min(lease_expires) - now()), 0)::float8
                   FROM jobs WHERE state = 'RUNNING'"""
            )
        return seconds

    async def heartbeat(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Renews ``owner``'s lease; returns whether a cancel was asked for. LeaseLost when
        ``owner`` no longer holds the job."""
        async with translated_errors():
            cancel: bool | None = await self._pool.fetchval(
                """UPDATE jobs SET lease_expires = now() + make_interval(secs => $3)
                   WHERE id = $1 AND lease_owner = $2 AND state = 'RUNNING'
                   RETURNING cancel_requested""",
                uuid.UUID(job_id),
                owner,
                lease_s,
            )
        if cancel is None:
            raise LeaseLost(job_id)
        return cancel

    async def report(self, job_id: str, owner: str, kind: str, data: Mapping[str, Any]) -> None:
        """Records a progress, metric or log event of ``owner``'s running job, and keeps the
        job's progress and latest metrics current."""
        async with translated_errors(), self._pool.acquire() as conn, conn.transaction():
            await self._fence(conn, job_id, owner)
            if kind == "progress":
                await conn.execute(
                    "UPDATE jobs SET progress = $2, progress_message = $3 WHERE id = $1",
                    uuid.UUID(job_id),
                    float(data["fraction"]),
                    str(data.get("message", "")),
                )
            elif kind == "metric":
                await conn.execute(
                    """UPDATE jobs SET metrics = metrics || jsonb_build_object($2::text, $3::float8)
                       WHERE id = $1""",
                    uuid.UUID(job_id),
                    str(data["name"]),
                    float(data["value"]),
                )
            await _add_event(conn, job_id, kind, data)

    async def save_artifact(self, job_id: str, owner: str, sha256: str, metrics: Mapping[str, float]) -> None:
        """Records the model an attempt trained (kept in the training store), so that a retry
        registers it rather than training again."""
        async with translated_errors(), self._pool.acquire() as conn, conn.transaction():
            await self._fence(conn, job_id, owner)
            await conn.execute(
                "UPDATE jobs SET artifact_sha256 = $2, metrics = metrics || $3::jsonb WHERE id = $1",
                uuid.UUID(job_id),
                sha256,
                json.dumps(dict(metrics)),
            )

    async def finish(self, job_id: str, owner: str, outcome: Outcome) -> Job:
        """Ends ``owner``'s attempt: SUCCEEDED, FAILED or CANCELLED for good, or QUEUED to be
        tried again (attempts permitting, else FAILED)."""
        async with translated_errors(), self._pool.acquire() as conn, conn.transaction():
            attempts, max_attempts = await self._fence(conn, job_id, owner)
            state = outcome.state
            if state is JobState.QUEUED and attempts >= max_attempts:
                state = JobState.FAILED
            ended = "now()" if state.finished else "NULL"
            row = await conn.fetchrow(
                f"""UPDATE jobs SET state = $2, error = $3, version = coalesce($4, version),
                        promoted = $5, metrics = metrics || $6::jsonb, lease_owner = NULL,
                        lease_expires = NULL, end_time = {ended}
                    WHERE id = $1 RETURNING {_COLUMNS}""",
                uuid.UUID(job_id),
                state.value,
                outcome.error,
                outcome.version,
                outcome.promoted,
                json.dumps(outcome.metrics),
            )
            await _state_event(conn, job_id, state, outcome.error, outcome.version)
        return _job(row)

    async def _fence(self, conn: asyncpg.Connection, job_id: str, owner: str) -> tuple[int, int]:
        row = await conn.fetchrow(
            """SELECT attempts, max_attempts FROM jobs
               WHERE id = $1 AND lease_owner = $2 AND state = 'RUNNING' FOR UPDATE""",
            uuid.UUID(job_id),
            owner,
        )
        if row is None:
            raise LeaseLost(job_id)
        return row["attempts"], row["max_attempts"]

    async def counts(self) -> Mapping[JobState, int]:
        """Jobs per state (for metrics and benchmarks)."""
        async with translated_errors():
            rows = await self._pool.fetch("SELECT state, count(*) AS n FROM jobs GROUP BY state")
        return {JobState(row["state"]): row["n"] for row in rows}
