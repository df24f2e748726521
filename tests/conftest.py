"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from services.mesh.postgres import EmbeddedPostgres, dsn_with_database

TEST_DATABASE_URL_ENV = "SCOREMESH_TEST_DATABASE_URL"
"""A PostgreSQL server for the tests (its user must be allowed to create databases); unset:
the session starts a private cluster."""


# PostgreSQL


@pytest.fixture(scope="session")
def postgres_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A superuser DSN for the session's server: ``SCOREMESH_TEST_DATABASE_URL``, or a private
    cluster that lives for the session. Tests take ``database_url`` instead."""
    configured = os.environ.get(TEST_DATABASE_URL_ENV)
    if configured:
        yield configured
        return
    cluster = EmbeddedPostgres(tmp_path_factory.mktemp("postgres"))
    try:
        yield cluster.start()
    finally:
        # destroy, not just stop: when we are root the data may live outside the tmp dir
        cluster.destroy()


@contextlib.asynccontextmanager
async def fresh_database(postgres_dsn: str) -> AsyncIterator[str]:
    """A new, empty database, dropped afterwards (with any sessions left in it)."""
    name = f"scoremesh_test_{uuid.uuid4().hex[:16]}"
    await _execute(postgres_dsn, f'CREATE DATABASE "{name}"')
    try:
        yield dsn_with_database(postgres_dsn, name)
    finally:
        await _execute(postgres_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def database_url(postgres_dsn: str) -> AsyncIterator[str]:
    """A new, empty database for one test."""
    async with fresh_database(postgres_dsn) as url:
        yield url


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()
