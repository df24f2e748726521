"""The training queue on a real PostgreSQL: claims, leases, fencing, cancels and retries,
driven through JobStore directly (no workers, no plugins)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from services.mesh.errors import FailedPrecondition, InvalidArgument, NotFound
from services.training.jobs import Job, JobState, JobStore, LeaseLost, NewJob, Outcome, Registration
from tests.integration.training_harness import ACME, GLOBEX

pytestmark = pytest.mark.integration

LEASE_S = 0.3


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[JobStore]:
    jobs = await JobStore.open(database_url, max_size=12)
    try:
        yield jobs
    finally:
        await jobs.close()


def _new(**overrides: object) -> NewJob:
    fields: dict[str, object] = {
        "plugin": "noop",
        "plugin_version": "1",
        "arguments": {"sleep_s": 0.0},
        "registration": Registration("m"),
        "max_attempts": 3,
        "time_limit_s": 60,
    }
    fields.update(overrides)
    return NewJob(**fields)  # type: ignore[arg-type]


async def _claim_within(store: JobStore, owner: str, timeout_s: float = 10.0) -> Job:
    """Claims until a job is claimable (a lease has to run out first), failing past the deadline."""
    deadline = time.monotonic() + timeout_s
    while (job := await store.claim(owner, LEASE_S)) is None:
        assert time.monotonic() < deadline, "no job became claimable"
        await asyncio.sleep(0.02)
    return job


async def _kinds(store: JobStore, job: Job) -> list[str]:
    return [f"{e.kind}:{e.data.get('state', '')}" for e in await store.events_after(job.id, 0)]


async def test_a_job_is_claimed_once_run_and_finished(store: JobStore) -> None:
    job, created = await store.submit(ACME, _new())
    assert (created, job.state, job.attempts) == (True, JobState.QUEUED, 0)
    claimed = await store.claim("w1", 30)
    assert claimed is not None
    assert (claimed.id, claimed.state, claimed.attempts, claimed.lease_owner) == (
        job.id,
        JobState.RUNNING,
        1,
        "w1",
    )
    assert await store.claim("w2", 30) is None
    await store.report(job.id, "w1", "progress", {"fraction": 0.5, "message": "half"})
    await store.report(job.id, "w1", "metric", {"name": "accuracy", "value": 0.75, "step": 1})
    assert await store.heartbeat(job.id, "w1", 30) is False
    done = await store.finish(job.id, "w1", Outcome(JobState.SUCCEEDED, version=4))
    assert (done.state, done.version, done.progress, done.metrics) == (
        JobState.SUCCEEDED,
        4,
        0.5,
        {"accuracy": 0.75},
    )
    assert done.end_time is not None
    assert await _kinds(store, job) == [
        "state:QUEUED",
        "state:RUNNING",
        "progress:",
        "metric:",
        "state:SUCCEEDED",
    ]


async def test_concurrent_claimers_never_share_a_job(store: JobStore) -> None:
    ids = {(await store.submit(ACME, _new()))[0].id for _ in range(30)}
    claimed: list[str] = []

    async def claimer(owner: str) -> None:
        while (job := await store.claim(owner, 30)) is not None:
            claimed.append(job.id)

    await asyncio.gather(*(claimer(f"w{i}") for i in range(8)))
    assert sorted(claimed) == sorted(ids)


async def test_an_expired_lease_passes_the_job_on_and_fences_the_old_owner(store: JobStore) -> None:
    job, _ = await store.submit(ACME, _new())
    first = await store.claim("dead", LEASE_S)
    assert first is not None
    second = await _claim_within(store, "alive")
    assert (second.id, second.attempts) == (job.id, 2)
    # the first owner's writes are refused from now on
    with pytest.raises(LeaseLost):
        await store.heartbeat(job.id, "dead", 30)
    with pytest.raises(LeaseLost):
        await store.report(job.id, "dead", "log", {"message": "late"})
    with pytest.raises(LeaseLost):
        await store.finish(job.id, "dead", Outcome(JobState.SUCCEEDED, version=1))
    with pytest.raises(LeaseLost):
        await store.save_artifact(job.id, "dead", "0" * 64, {})
    assert (await store.get(ACME, job.id)).lease_owner == "alive"


async def test_a_job_out_of_attempts_fails_when_its_lease_expires(store: JobStore) -> None:
    job, _ = await store.submit(ACME, _new(max_attempts=1))
    assert await store.claim("dead", LEASE_S) is not None
    deadline = time.monotonic() + 10
    while (await store.get(ACME, job.id)).state is JobState.RUNNING:
        assert time.monotonic() < deadline
        assert await store.claim("other", LEASE_S) is None  # settles it once the lease is out
        await asyncio.sleep(0.02)
    failed = await store.get(ACME, job.id)
    assert failed.state is JobState.FAILED
    assert "lease expired" in failed.error


async def test_requeued_attempts_count_and_run_out(store: JobStore) -> None:
    job, _ = await store.submit(ACME, _new(max_attempts=2))
    for attempt, expected in ((1, JobState.QUEUED), (2, JobState.FAILED)):
        claimed = await store.claim("w", 30)
        assert claimed is not None
        assert claimed.attempts == attempt
        ended = await store.finish(job.id, "w", Outcome(JobState.QUEUED, "registry unavailable"))
        assert ended.state is expected
    assert await store.claim("w", 30) is None


async def test_cancel_a_queued_job_at_once_and_a_running_one_through_its_heartbeat(store: JobStore) -> None:
    queued, _ = await store.submit(ACME, _new())
    assert (await store.cancel(ACME, queued.id)).state is JobState.CANCELLED
    assert await store.claim("w", 30) is None
    running, _ = await store.submit(ACME, _new())
    assert await store.claim("w", LEASE_S) is not None
    marked = await store.cancel(ACME, running.id)
    assert (marked.state, marked.cancel_requested) == (JobState.RUNNING, True)
    assert await store.heartbeat(running.id, "w", LEASE_S) is True
    # a worker that died before stopping it: the job ends CANCELLED, not retried
    deadline = time.monotonic() + 10
    while (await store.get(ACME, running.id)).state is JobState.RUNNING:
        assert time.monotonic() < deadline
        assert await store.claim("other", LEASE_S) is None
        await asyncio.sleep(0.02)
    assert (await store.get(ACME, running.id)).state is JobState.CANCELLED
    # cancelling a finished job changes nothing
    assert (await store.cancel(ACME, running.id)).state is JobState.CANCELLED


async def test_idempotency_keys_are_per_tenant_and_bound_to_the_request(store: JobStore) -> None:
    first, created = await store.submit(ACME, _new(idempotency_key="k"))
    again, created_again = await store.submit(ACME, _new(idempotency_key="k"))
    assert (created, created_again, again.id) == (True, False, first.id)
    with pytest.raises(FailedPrecondition):
        await store.submit(ACME, _new(idempotency_key="k", arguments={"sleep_s": 1.0}))
    other, created_other = await store.submit(GLOBEX, _new(idempotency_key="k"))
    assert created_other
    assert other.id != first.id


async def test_tenants_and_pages(store: JobStore) -> None:
    ids = [(await store.submit(ACME, _new()))[0].id for _ in range(5)]
    await store.submit(GLOBEX, _new())
    seen: list[str] = []
    token = ""
    while True:
        page = await store.list(ACME, page_size=2, page_token=token)
        seen += [j.id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids[::-1]  # newest first
    assert [j.id for j in (await store.list(ACME, state=JobState.RUNNING)).jobs] == []
    with pytest.raises(InvalidArgument):
        await store.list(ACME, page_token="junk")
    for job_id in (ids[0], "not-a-uuid"):
        with pytest.raises(NotFound):
            await store.get(GLOBEX, job_id)
