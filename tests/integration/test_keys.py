"""API keys and usage counters on a real PostgreSQL (a fresh database per test)."""

from __future__ import annotations

import asyncio
import hashlib
import stat
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from services.gateway.keys import (
    ADMIN_KEY_FILE,
    CACHE_TTL_S,
    ApiKey,
    KeyStore,
    RateLimit,
    Scope,
    bearer_token,
    ensure_admin_key,
    require,
)
from services.gateway.quotas import UsageRecorder
from services.mesh.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from tests.fakes import FakeClock

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(database_url: str, clock: FakeClock) -> AsyncIterator[KeyStore]:
    store = await KeyStore.open(database_url, clock=clock)
    try:
        yield store
    finally:
        await store.close()


async def _create(store: KeyStore, tenant: str = "acme", *scopes: Scope) -> tuple[ApiKey, str]:
    return await store.create(
        tenant, [s.value for s in scopes or (Scope.SCORE,)], description="ci", created_by="alice"
    )


async def _unauthenticated(store: KeyStore, plaintext: str) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as caught:
        await store.authenticate(plaintext)
    return caught.value


def _fields(error: InvalidArgument) -> set[str]:
    return {v.field for v in error.violations}


# creating and authenticating


async def test_a_created_key_authenticates_with_its_tenant_and_scopes(store: KeyStore) -> None:
    key, plaintext = await store.create(
        "acme",
        ["score", "models:read"],
        description="batch scorer",
        created_by="alice",
        rate=RateLimit(5.0, 10),
    )
    assert plaintext.startswith(f"smk_{key.id}_")
    assert len(key.id) == 12
    assert key.scopes == {Scope.SCORE, Scope.MODELS_READ}
    assert (key.tenant, key.description, key.created_by) == ("acme", "batch scorer", "alice")
    assert key.rate == RateLimit(5.0, 10)
    assert not key.revoked

    found = await store.authenticate(bearer_token(f"Bearer {plaintext}"))
    assert found.id == key.id
    assert found.tenant == "acme"
    require(found, Scope.SCORE)
    require(found, Scope.MODELS_READ)
    with pytest.raises(PermissionDenied) as caught:
        require(found, Scope.MODELS_WRITE)
    assert "models:write" in caught.value.message
    assert caught.value.metadata["scope"] == "models:write"
    assert caught.value.reason == "MISSING_SCOPE"


async def test_admin_does_not_imply_other_scopes(store: KeyStore) -> None:
    key, _ = await _create(store, "acme", Scope.ADMIN)
    require(key, Scope.ADMIN)
    with pytest.raises(PermissionDenied):
        require(key, Scope.SCORE)


async def test_the_plaintext_is_never_stored(store: KeyStore, database_url: str) -> None:
    _, plaintext = await _create(store)
    secret = plaintext.rsplit("_", 1)[1]
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT * FROM api_keys")
    finally:
        await conn.close()
    assert len(rows) == 1
    assert bytes(rows[0]["hash"]) == hashlib.sha256(plaintext.encode()).digest()
    for value in rows[0].values():
        text = value.hex() if isinstance(value, bytes) else str(value)
        assert secret not in text
        assert plaintext not in text


async def test_keys_are_unique(store: KeyStore) -> None:
    created = [await _create(store) for _ in range(20)]
    assert len({key.id for key, _ in created}) == 20
    assert len({plaintext for _, plaintext in created}) == 20


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "API_KEY_MISSING"),
        ("", "API_KEY_MISSING"),
        ("   ", "API_KEY_MISSING"),
        ("Basic dXNlcjpwYXNz", "API_KEY_MALFORMED"),
        ("Bearer", "API_KEY_MALFORMED"),
        ("Bearer ", "API_KEY_MALFORMED"),
    ],
)
def test_a_missing_or_non_bearer_header_is_unauthenticated(header: str | None, reason: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        bearer_token(header)
    assert caught.value.reason == reason


def test_the_bearer_scheme_is_case_insensitive() -> None:
    assert bearer_token("bearer  smk_x ") == "smk_x"


@pytest.mark.parametrize(
    "token",
    [
        "not-a-key",
        "smk_abc_def",
        "smk_0123456789ab_short",
        "smk_0123456789AB_" + "a" * 43,  # the id is lower-case hex
        "smk_0123456789ab_" + "a" * 42 + "!",
        "xyz_0123456789ab_" + "a" * 43,
        "smk_0123456789ab_" + "a" * 43 + "\n",
    ],
)
async def test_a_malformed_key_is_unauthenticated(store: KeyStore, token: str) -> None:
    error = await _unauthenticated(store, token)
    assert error.reason == "API_KEY_MALFORMED"


async def test_an_unknown_key_and_a_wrong_secret_look_alike(database_url: str, store: KeyStore) -> None:
    key, plaintext = await _create(store)
    await store.authenticate(plaintext)  # now cached
    wrong_secret = plaintext[:-4] + ("aaaa" if not plaintext.endswith("aaaa") else "bbbb")
    unknown_id = "smk_000000000000_" + plaintext.rsplit("_", 1)[1]
    cached = await _unauthenticated(store, wrong_secret)
    unknown = await _unauthenticated(store, unknown_id)
    # another gateway process, whose cache is empty
    other = await KeyStore.open(database_url)
    try:
        uncached = await _unauthenticated(other, wrong_secret)
    finally:
        await other.close()
    assert {(e.reason, e.message) for e in (cached, unknown, uncached)} == {
        ("API_KEY_INVALID", "the API key is not valid")
    }
    assert key.id not in cached.message


# revoking


async def test_a_revoked_key_is_refused_at_once_by_the_process_that_revoked_it(store: KeyStore) -> None:
    key, plaintext = await _create(store)
    await store.authenticate(plaintext)
    revoked = await store.revoke(key.id)
    assert revoked.revoke_time is not None
    error = await _unauthenticated(store, plaintext)
    assert error.reason == "API_KEY_REVOKED"
    assert key.id in error.message
    # revoking again keeps the first time
    assert (await store.revoke(key.id)).revoke_time == revoked.revoke_time


async def test_another_process_sees_a_revocation_within_the_cache_ttl(
    database_url: str, store: KeyStore
) -> None:
    other_clock = FakeClock()
    other = await KeyStore.open(database_url, clock=other_clock)
    try:
        key, plaintext = await _create(store)
        assert (await other.authenticate(plaintext)).id == key.id
        await store.revoke(key.id)
        # the other process trusts its cache until the TTL runs out
        other_clock.now += CACHE_TTL_S - 0.1
        assert (await other.authenticate(plaintext)).id == key.id
        other_clock.now += 0.2
        assert (await _unauthenticated(other, plaintext)).reason == "API_KEY_REVOKED"
    finally:
        await other.close()


async def test_revoking_an_unknown_key_is_not_found(store: KeyStore) -> None:
    with pytest.raises(NotFound) as caught:
        await store.revoke("000000000000")
    assert caught.value.reason == "API_KEY_NOT_FOUND"
    with pytest.raises(NotFound):
        await store.get("000000000000")


async def test_authenticating_records_the_last_use(store: KeyStore) -> None:
    key, plaintext = await _create(store)
    assert key.last_used_time is None
    await store.authenticate(plaintext)
    assert (await store.get(key.id)).last_used_time is not None


# listing


async def test_list_shows_one_tenant_or_all_in_pages(store: KeyStore) -> None:
    acme = {(await _create(store, "acme"))[0].id for _ in range(5)}
    globex = {(await _create(store, "globex"))[0].id for _ in range(2)}

    seen: list[str] = []
    token = ""
    while True:
        page = await store.list("acme", page_size=2, page_token=token)
        assert len(page.keys) <= 2
        assert all(k.tenant == "acme" for k in page.keys)
        seen += [k.id for k in page.keys]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(acme)

    everything = await store.list()
    assert {k.id for k in everything.keys} == acme | globex
    assert everything.next_page_token == ""

    revoked = sorted(globex)[0]
    await store.revoke(revoked)
    active = await store.list("globex", include_revoked=False)
    assert [k.id for k in active.keys] == sorted(globex - {revoked})


async def test_a_page_token_only_works_with_its_tenant_filter(store: KeyStore) -> None:
    for _ in range(3):
        await _create(store, "acme")
    page = await store.list("acme", page_size=1)
    with pytest.raises(InvalidArgument) as caught:
        await store.list("globex", page_token=page.next_page_token)
    assert _fields(caught.value) == {"page_token"}
    with pytest.raises(InvalidArgument):
        await store.list("acme", page_token="not a token")
    with pytest.raises(InvalidArgument) as negative:
        await store.list("acme", page_size=-1)
    assert _fields(negative.value) == {"page_size"}


# validation


@pytest.mark.parametrize(
    ("tenant", "scopes", "rate", "fields"),
    [
        ("", ["score"], None, {"tenant"}),
        ("has space", ["score"], None, {"tenant"}),
        ("x" * 64, ["score"], None, {"tenant"}),
        ("acme", [], None, {"scopes"}),
        ("acme", ["score", "delete-everything"], None, {"scopes"}),
        ("acme", ["score"], RateLimit(0.0, 1), {"rate.requests_per_second"}),
        ("acme", ["score"], RateLimit(float("nan"), 1), {"rate.requests_per_second"}),
        ("acme", ["score"], RateLimit(1.0, 0), {"rate.burst"}),
        ("", ["nope"], RateLimit(-1.0, -1), {"tenant", "scopes", "rate.requests_per_second", "rate.burst"}),
    ],
)
async def test_bad_inputs_are_invalid_arguments_naming_the_fields(
    store: KeyStore, tenant: str, scopes: list[str], rate: RateLimit | None, fields: set[str]
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await store.create(tenant, scopes, created_by="alice", rate=rate)
    assert _fields(caught.value) == fields
    assert (await store.list()).keys == ()


async def test_an_unknown_scope_is_named_in_the_violation(store: KeyStore) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await store.create("acme", ["scor"], created_by="alice")
    assert "'scor'" in caught.value.violations[0].description


# the admin key


async def test_ensure_admin_key_creates_a_private_file_once(store: KeyStore, tmp_path: Path) -> None:
    home = tmp_path / "home"
    plaintext = await ensure_admin_key(home, store)
    assert plaintext is not None
    path = home / ADMIN_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == plaintext
    assert [p.name for p in home.iterdir()] == [ADMIN_KEY_FILE]  # no temporary left behind

    key = await store.authenticate(plaintext)
    assert key.tenant == "default"
    assert key.scopes == set(Scope)

    assert await ensure_admin_key(home, store) is None
    assert path.read_text().strip() == plaintext
    assert len((await store.list()).keys) == 1


async def test_ensure_admin_key_replaces_a_revoked_key(store: KeyStore, tmp_path: Path) -> None:
    first = await ensure_admin_key(tmp_path, store)
    assert first is not None
    await store.revoke((await store.authenticate(first)).id)
    second = await ensure_admin_key(tmp_path, store)
    assert second is not None
    assert second != first
    assert (tmp_path / ADMIN_KEY_FILE).read_text().strip() == second
    assert stat.S_IMODE((tmp_path / ADMIN_KEY_FILE).stat().st_mode) == 0o600


# usage


async def test_usage_counts_are_exact_under_concurrent_records_and_flushes(store: KeyStore) -> None:
    a, _ = await _create(store, "acme")
    b, _ = await _create(store, "globex")
    wall = FakeClock(datetime(2025, 3, 1, 10, 30, tzinfo=UTC).timestamp())
    # a tiny interval, so that background flushes interleave with the records
    recorder = UsageRecorder(store, flush_interval_s=0.001, clock=wall)
    recorder.start()

    async def request(i: int) -> None:
        await asyncio.sleep(0)  # yield, letting other requests and flushes run in between
        recorder.record(a if i % 4 else b, "iris" if i % 2 else "", rows=i % 7)
        if i % 100 == 0:
            await recorder.flush()

    try:
        await asyncio.gather(*(request(i) for i in range(1000)))
        rows = await recorder.usage()
    finally:
        await recorder.close()

    expected: dict[tuple[str, str], list[int]] = {}
    for i in range(1000):
        counts = expected.setdefault(((a if i % 4 else b).id, "iris" if i % 2 else ""), [0, 0])
        counts[0] += 1
        counts[1] += i % 7
    hour = datetime(2025, 3, 1, 10, tzinfo=UTC)
    assert {(r.key_id, r.model): [r.requests, r.rows] for r in rows} == expected
    assert all(r.bucket == hour for r in rows)
    assert sum(r.requests for r in rows) == 1000
    assert {r.tenant for r in rows if r.key_id == b.id} == {"globex"}

    acme_rows = await store.read_usage(tenant="acme")
    assert {r.key_id for r in acme_rows} == {a.id}
    assert await store.read_usage(key_id=b.id) == [r for r in rows if r.key_id == b.id]


async def test_usage_is_bucketed_by_hour_and_filtered_by_since(store: KeyStore) -> None:
    key, _ = await _create(store)
    start = datetime(2025, 3, 1, 10, 59, 59, tzinfo=UTC)
    wall = FakeClock(start.timestamp())
    recorder = UsageRecorder(store, clock=wall)  # not started: only explicit flushes
    recorder.record(key, "iris", rows=3)
    wall.now += 2  # 11:00:01
    recorder.record(key, "iris", rows=4)
    recorder.record(key, "iris", rows=5)
    rows = await recorder.usage(key_id=key.id)
    assert [(r.bucket.hour, r.requests, r.rows) for r in rows] == [(10, 1, 3), (11, 2, 9)]
    later = await recorder.usage(key_id=key.id, since=start + timedelta(seconds=30))
    assert [(r.bucket.hour, r.requests) for r in later] == [(11, 2)]
    # flushing again adds to the same rows
    recorder.record(key, "iris", rows=1)
    again = await recorder.usage(key_id=key.id, since=start + timedelta(seconds=30))
    assert [(r.requests, r.rows) for r in again] == [(3, 10)]
    await recorder.close()


async def test_close_writes_what_is_left(database_url: str, store: KeyStore) -> None:
    key, _ = await _create(store)
    recorder = UsageRecorder(store, flush_interval_s=3600)
    recorder.start()
    for _ in range(7):
        recorder.record(key, "iris", rows=2)
    assert recorder.pending == 1
    await recorder.close()
    other = await KeyStore.open(database_url)
    try:
        rows = await other.read_usage(key_id=key.id)
    finally:
        await other.close()
    assert [(r.requests, r.rows) for r in rows] == [(7, 14)]
