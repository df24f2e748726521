"""Versioned SQL migrations, applied once per database however many replicas start at once.

A component (``registry``, ``training``) keeps its migrations as files named
``NNNN_description.sql`` in a Python package, shipped as package data. Each file runs once, in
version order; ``schema_migrations`` records what ran. A file may hold several statements;
all pending files run in one transaction, so statements that cannot run in a transaction
(``CREATE INDEX CONCURRENTLY``) do not belong in them.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.resources.abc import Traversable

import asyncpg

from services.mesh.postgres import TracedConnection

log = logging.getLogger(__name__)

_FILE_NAME = re.compile(r"(?P<version>\d{4,})_(?P<name>[A-Za-z0-9_]+)\.sql")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component  text NOT NULL,
    version    int NOT NULL,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)
"""


class MigrationError(RuntimeError):
    """The migration files and the database's record of them disagree, or a file is misnamed."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def file_name(self) -> str:
        return f"{self.version:04d}_{self.name}.sql"


def load_migrations(source: str | Traversable) -> list[Migration]:
    """The migrations in a package (dotted name) or directory, in version order.

    Raises :class:`MigrationError` for a ``.sql`` file not named ``NNNN_description.sql`` and
    for two files with one version."""
    directory = importlib.resources.files(source) if isinstance(source, str) else source
    by_version: dict[int, Migration] = {}
    for entry in directory.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.fullmatch(entry.name)
        if match is None:
            raise MigrationError(f"{entry.name}: migration files are named NNNN_description.sql")
        migration = Migration(int(match["version"]), match["name"], entry.read_text(encoding="utf-8"))
        clash = by_version.get(migration.version)
        if clash is not None:
            raise MigrationError(f"{clash.file_name} and {entry.name} have the same version in {source}")
        by_version[migration.version] = migration
    return [by_version[version] for version in sorted(by_version)]


def lock_key(component: str) -> int:
    """The advisory lock that serializes one component's migrations: a stable signed 64-bit
    number (Python's ``hash`` differs between processes)."""
    digest = hashlib.sha256(f"scoremesh.migrations:{component}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def apply_migrations(
    conn: asyncpg.Connection, *, component: str, package: str | Traversable
) -> list[int]:
    """Applies ``component``'s pending migrations from ``package`` and returns their versions.

    All of them run in one transaction that holds ``pg_advisory_xact_lock(lock_key(component))``:
    replicas that start together wait for each other, and each migration runs exactly once (or,
    if one fails, none of that run's are recorded). Must be called outside a transaction.

    Raises :class:`MigrationError` when a recorded version has no file, or its file now has
    another name, or files are misnamed; nothing is applied then.
    """
    if conn.is_in_transaction():
        # the lock would outlive this call, and a failure would abort the caller's transaction
        raise MigrationError("apply_migrations must run outside a transaction")
    migrations = load_migrations(package)
    await _ensure_table(conn)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key(component))
        rows = await conn.fetch(
            "SELECT version, name FROM schema_migrations WHERE component = $1 ORDER BY version", component
        )
        applied: dict[int, str] = {row["version"]: row["name"] for row in rows}
        files = {migration.version: migration for migration in migrations}
        for version, name in applied.items():
            migration = files.get(version)
            if migration is None:
                raise MigrationError(
                    f"{component} migration {version:04d}_{name}.sql was applied but is missing "
                    f"from {package}"
                )
            if migration.name != name:
                raise MigrationError(
                    f"{component} migration {version:04d} was applied as {name!r} but the file is now "
                    f"{migration.file_name}"
                )
        pending = [migration for migration in migrations if migration.version not in applied]
        for migration in pending:
            log.info("applying %s migration %s", component, migration.file_name)
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (component, version, name) VALUES ($1, $2, $3)",
                component,
                migration.version,
                migration.name,
            )
    return [migration.version for migration in pending]


async def _ensure_table(conn: asyncpg.Connection) -> None:
    if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
        return
    try:
        async with conn.transaction():
            await conn.execute(_CREATE_TABLE)
    except (asyncpg.UniqueViolationError, asyncpg.DuplicateTableError):
        # Two sessions' CREATE TABLE IF NOT EXISTS can race: the loser fails on the catalog's
        # unique index instead of skipping. The table exists either way.
        log.debug("schema_migrations was created by a concurrent session")


async def migrated_pool(
    dsn: str,
    *,
    component: str,
    package: str,
    min_size: int,
    max_size: int,
    init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
) -> asyncpg.Pool:
    """Applies ``component``'s pending migrations on a connection of its own, then opens the
    pool a store works with: every store starts this way."""
    conn = await asyncpg.connect(dsn)
    try:
        applied = await apply_migrations(conn, component=component, package=package)
    finally:
        await conn.close()
    if applied:
        log.info("applied %s migrations %s", component, applied)
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=init, connection_class=TracedConnection
    )
    return pool
