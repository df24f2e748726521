"""Versioned migrations against a real PostgreSQL, replicas racing included."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from services.mesh.migrations import MigrationError, apply_migrations, load_migrations

pytestmark = pytest.mark.integration

FIXTURE = "tests.migrations_fixture"


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


def _write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir()
    for name, sql in files.items():
        (directory / name).write_text(sql)
    return directory


async def _recorded(conn: asyncpg.Connection, component: str) -> list[tuple[int, str]]:
    rows = await conn.fetch(
        "SELECT version, name FROM schema_migrations WHERE component = $1 ORDER BY version", component
    )
    return [(row["version"], row["name"]) for row in rows]


async def _exists(conn: asyncpg.Connection, table: str) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table))


async def test_applies_pending_migrations_in_order(conn: asyncpg.Connection) -> None:
    assert await apply_migrations(conn, component="fixture", package=FIXTURE) == [1, 2]

    assert await _recorded(conn, "fixture") == [(1, "a"), (2, "b")]
    # 0002 alters the table 0001 creates, so it ran second
    assert await conn.fetchval("SELECT tag FROM fixture_items WHERE id = 1") == "none"


async def test_a_second_run_applies_nothing(conn: asyncpg.Connection) -> None:
    await apply_migrations(conn, component="fixture", package=FIXTURE)

    assert await apply_migrations(conn, component="fixture", package=FIXTURE) == []
    assert await conn.fetchval("SELECT count(*) FROM fixture_items") == 1


async def test_a_new_migration_is_applied_after_the_recorded_ones(
    conn: asyncpg.Connection, tmp_path: Path
) -> None:
    await apply_migrations(conn, component="fixture", package=FIXTURE)
    later = _write(
        tmp_path / "later",
        {
            **{m.file_name: m.sql for m in load_migrations(FIXTURE)},
            "0003_c.sql": "INSERT INTO fixture_items (id, note) VALUES (2, 'added by 0003');",
        },
    )

    assert await apply_migrations(conn, component="fixture", package=later) == [3]
    assert await _recorded(conn, "fixture") == [(1, "a"), (2, "b"), (3, "c")]


async def test_concurrent_replicas_apply_each_migration_exactly_once(database_url: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        conns = []
        for _ in range(5):
            connection = await asyncpg.connect(database_url)
            stack.push_async_callback(connection.close)
            conns.append(connection)

        # all five also race to create schema_migrations itself
        results = await asyncio.gather(
            *(apply_migrations(connection, component="fixture", package=FIXTURE) for connection in conns)
        )

        # one replica applied everything in its transaction; the others found nothing to do
        assert sorted(results) == [[], [], [], [], [1, 2]]
        assert await _recorded(conns[0], "fixture") == [(1, "a"), (2, "b")]
        assert await conns[0].fetchval("SELECT count(*) FROM fixture_items") == 1


async def test_components_keep_separate_records(conn: asyncpg.Connection, tmp_path: Path) -> None:
    other = _write(tmp_path / "other", {"0001_other.sql": "CREATE TABLE other_items (id int);"})

    assert await apply_migrations(conn, component="fixture", package=FIXTURE) == [1, 2]
    assert await apply_migrations(conn, component="other", package=other) == [1]
    assert await _recorded(conn, "other") == [(1, "other")]


async def test_a_recorded_migration_without_its_file_is_an_error(conn: asyncpg.Connection) -> None:
    await apply_migrations(conn, component="fixture", package=FIXTURE)
    await conn.execute(
        "INSERT INTO schema_migrations (component, version, name) VALUES ('fixture', 3, 'gone')"
    )

    with pytest.raises(MigrationError, match=r"0003_gone\.sql was applied but is missing"):
        await apply_migrations(conn, component="fixture", package=FIXTURE)


async def test_a_renamed_migration_is_an_error_and_nothing_is_applied(
    conn: asyncpg.Connection, tmp_path: Path
) -> None:
    await apply_migrations(conn, component="fixture", package=FIXTURE)
    renamed = _write(
        tmp_path / "renamed",
        {
            "0001_renamed.sql": "SELECT 1;",
            "0002_b.sql": "SELECT 1;",
            "0003_c.sql": "CREATE TABLE never_created (id int);",
        },
    )

    with pytest.raises(
        MigrationError, match=r"0001 was applied as 'a' but the file is now 0001_renamed\.sql"
    ):
        await apply_migrations(conn, component="fixture", package=renamed)
    assert not await _exists(conn, "never_created")


async def test_two_files_with_one_version_are_an_error(conn: asyncpg.Connection, tmp_path: Path) -> None:
    clash = _write(tmp_path / "clash", {"0001_a.sql": "SELECT 1;", "0001_b.sql": "SELECT 1;"})

    with pytest.raises(MigrationError, match=r"0001_a\.sql and 0001_b\.sql have the same version"):
        await apply_migrations(conn, component="clash", package=clash)
    assert not await _exists(conn, "schema_migrations")


@pytest.mark.parametrize("name", ["1_short.sql", "0001-dash.sql", "0001_.sql", "0001_a.b.sql"])
async def test_a_misnamed_file_is_an_error(conn: asyncpg.Connection, tmp_path: Path, name: str) -> None:
    misnamed = _write(tmp_path / "misnamed", {name: "SELECT 1;"})

    with pytest.raises(MigrationError, match=r"NNNN_description\.sql"):
        await apply_migrations(conn, component="misnamed", package=misnamed)


async def test_a_failing_migration_applies_and_records_nothing(
    conn: asyncpg.Connection, tmp_path: Path
) -> None:
    failing = _write(
        tmp_path / "failing",
        {"0001_ok.sql": "CREATE TABLE first_items (id int);", "0002_bad.sql": "CREATE TABLE oops (;"},
    )

    with pytest.raises(asyncpg.PostgresSyntaxError):
        await apply_migrations(conn, component="failing", package=failing)
    assert not await _exists(conn, "first_items")
    assert await _recorded(conn, "failing") == []


async def test_refuses_to_run_inside_a_transaction(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        with pytest.raises(MigrationError, match="outside a transaction"):
            await apply_migrations(conn, component="fixture", package=FIXTURE)
