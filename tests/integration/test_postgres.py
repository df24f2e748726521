"""The private PostgreSQL cluster: a real server started, stopped and restarted in a tmp dir."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import asyncpg
import pytest

from services.mesh.postgres import (
    BINDIR_ENV,
    LOCATION_FILE,
    RELOCATED_BASE,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    PostgresNotFound,
    dsn_with_database,
    find_postgres_bindir,
    resolve_database_url,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


class MakeCluster(Protocol):
    def __call__(self, root: Path, *, bindir: Path | None = None) -> EmbeddedPostgres: ...


@pytest.fixture
def reachable_tmp() -> Iterator[Path]:
    """A tmp dir that ``nobody`` can reach, unlike pytest's (mode 0700 under /tmp when we are
    root), so that a cluster's data stays inside it."""
    path = Path(tempfile.mkdtemp(prefix="scoremesh-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def make_cluster(reachable_tmp: Path) -> Iterator[MakeCluster]:
    """Builds clusters and destroys them all after the test, wherever their data lives (and
    before ``reachable_tmp`` goes, which it depends on for that reason)."""
    made: list[EmbeddedPostgres] = []

    def make(root: Path, *, bindir: Path | None = None) -> EmbeddedPostgres:
        cluster = EmbeddedPostgres(root, bindir=bindir)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.destroy()


async def _query(dsn: str, sql: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def test_start_query_stop_and_restart_reuses_the_data(
    make_cluster: MakeCluster, reachable_tmp: Path
) -> None:
    cluster = make_cluster(reachable_tmp / "pg")

    dsn = await asyncio.to_thread(cluster.start)
    assert dsn.startswith("postgresql://postgres@/postgres?host=/tmp/")
    assert cluster.running
    assert cluster.data_dir == reachable_tmp / "pg" / "data"
    assert await _query(dsn, "SHOW listen_addresses") == ""
    assert await _query(dsn, "SHOW server_encoding") == "UTF8"
    await _query(dsn, "CREATE TABLE kept AS SELECT 42 AS answer")
    socket_dir = Path(cluster.host)

    await asyncio.to_thread(cluster.stop)
    assert not cluster.running
    assert not socket_dir.exists()
    assert not (cluster.data_dir / "postmaster.pid").exists()
    await asyncio.to_thread(cluster.stop)  # idempotent

    restarted = await asyncio.to_thread(cluster.start)
    assert await _query(restarted, "SELECT answer FROM kept") == 42
    assert cluster.log_path.read_text().count("creating subdirectories") == 1  # one initdb


async def test_context_manager_and_host_port_user(make_cluster: MakeCluster, reachable_tmp: Path) -> None:
    cluster = make_cluster(reachable_tmp / "pg")

    with cluster as started:
        conn = await asyncpg.connect(
            host=started.host, port=started.port, user=started.user, database="postgres"
        )
        try:
            assert await conn.fetchval("SELECT current_user") == "postgres"
        finally:
            await conn.close()
    assert not cluster.running


async def test_stop_without_start_does_nothing(make_cluster: MakeCluster, reachable_tmp: Path) -> None:
    cluster = make_cluster(reachable_tmp / "pg")

    await asyncio.to_thread(cluster.stop)

    assert not cluster.running


async def test_a_stale_postmaster_pid_is_replaced(make_cluster: MakeCluster, reachable_tmp: Path) -> None:
    cluster = make_cluster(reachable_tmp / "pg")
    await asyncio.to_thread(cluster.start)
    pid_file = cluster.data_dir / "postmaster.pid"
    lines = pid_file.read_text().splitlines(keepends=True)
    owner = pid_file.stat()
    await asyncio.to_thread(cluster.stop)
    # what a server killed with SIGKILL leaves behind: its file, naming a process that is gone
    gone = await asyncio.create_subprocess_exec("true")
    await gone.wait()
    pid_file.write_text("".join([f"{gone.pid}\n", *lines[1:]]))
    os.chown(pid_file, owner.st_uid, owner.st_gid)

    dsn = await asyncio.to_thread(cluster.start)

    assert await _query(dsn, "SELECT 1") == 1


async def test_a_restart_right_after_the_server_was_killed(
    make_cluster: MakeCluster, reachable_tmp: Path
) -> None:
    cluster = make_cluster(reachable_tmp / "pg")
    await asyncio.to_thread(cluster.start)
    pid = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    await asyncio.to_thread(cluster.stop)  # notices the server is gone

    dsn = await asyncio.to_thread(cluster.start)

    assert await _query(dsn, "SELECT 1") == 1


async def test_a_server_left_by_a_process_that_died_is_restarted(
    make_cluster: MakeCluster, reachable_tmp: Path
) -> None:
    root = reachable_tmp / "pg"
    # starts the cluster and dies without stopping it, as if killed
    script = (
        "import os, sys; from pathlib import Path; from services.mesh.postgres import EmbeddedPostgres; "
        "EmbeddedPostgres(Path(sys.argv[1])).start(); os._exit(0)"
    )
    owner = await asyncio.create_subprocess_exec(sys.executable, "-c", script, str(root), cwd=REPO)
    assert await asyncio.wait_for(owner.wait(), 60) == 0
    cluster = make_cluster(root)
    orphan = (cluster.data_dir / "postmaster.pid").read_text().splitlines()
    orphan_pid, orphan_socket_dir = orphan[0], Path(orphan[4])

    dsn = await asyncio.to_thread(cluster.start)

    assert await _query(dsn, "SELECT 1") == 1
    assert (cluster.data_dir / "postmaster.pid").read_text().split()[0] != orphan_pid
    assert not orphan_socket_dir.exists()


async def test_a_second_owner_of_a_running_cluster_is_refused(
    make_cluster: MakeCluster, reachable_tmp: Path
) -> None:
    first = make_cluster(reachable_tmp / "pg")
    await asyncio.to_thread(first.start)
    second = make_cluster(reachable_tmp / "pg")

    with pytest.raises(EmbeddedPostgresError, match=rf"in use by another process \(pid {os.getpid()}\)"):
        await asyncio.to_thread(second.start)
    assert await _query(first.dsn, "SELECT 1") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="only root's clusters are relocated")
async def test_as_root_an_unreachable_root_keeps_its_data_under_var_tmp(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    root = private / "pg"
    cluster = make_cluster(root)

    dsn = await asyncio.to_thread(cluster.start)

    assert await _query(dsn, "SELECT 1") == 1
    assert cluster.data_dir.parent.parent == RELOCATED_BASE
    assert (root / LOCATION_FILE).read_text().strip() == str(cluster.data_dir)
    info = cluster.data_dir.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid != 0
    assert cluster.log_path.parent == root
    await asyncio.to_thread(cluster.stop)
    # a new object finds the same data through the record
    assert make_cluster(root).data_dir == cluster.data_dir

    data_dir = cluster.data_dir
    await asyncio.to_thread(cluster.destroy)
    assert not data_dir.parent.exists()
    assert not (root / LOCATION_FILE).exists()


async def test_a_bindir_without_the_programs_is_a_clear_error(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    cluster = make_cluster(tmp_path / "pg", bindir=empty)

    with pytest.raises(
        PostgresNotFound, match=r"lacks the PostgreSQL server programs initdb, pg_ctl, postgres"
    ):
        await asyncio.to_thread(cluster.start)
    assert not cluster.running


async def test_a_failing_initdb_is_reported_with_the_log_tail(
    make_cluster: MakeCluster, reachable_tmp: Path
) -> None:
    bindir = reachable_tmp / "bin"
    bindir.mkdir()
    for name in ("initdb", "pg_ctl", "postgres"):
        program = bindir / name
        program.write_text("#!/bin/sh\necho 'initdb: error: the disk is on fire' >&2\nexit 1\n")
        program.chmod(0o755)
    cluster = make_cluster(reachable_tmp / "pg", bindir=bindir)

    with pytest.raises(EmbeddedPostgresError, match=r"(?s)initdb failed \(1\).*the disk is on fire"):
        await asyncio.to_thread(cluster.start)
    assert not (reachable_tmp / "pg" / "data").exists()
    # the lock was released: a later attempt fails the same way, not as "in use"
    with pytest.raises(EmbeddedPostgresError, match="initdb failed"):
        await asyncio.to_thread(cluster.start)


def test_find_postgres_bindir_prefers_the_environment(tmp_path: Path) -> None:
    assert find_postgres_bindir({BINDIR_ENV: str(tmp_path)}) == tmp_path


def test_find_postgres_bindir_finds_server_programs() -> None:
    found = find_postgres_bindir({})
    if found is None:
        pytest.skip("no PostgreSQL server programs on this machine")
    assert all((found / name).is_file() for name in ("initdb", "pg_ctl", "postgres"))


def test_resolve_database_url_prefers_the_scoremesh_variable() -> None:
    assert resolve_database_url(
        {"SCOREMESH_DATABASE_URL": "postgresql://a/x", "DATABASE_URL": "postgresql://b/y"}
    ) == ("postgresql://a/x")
    assert resolve_database_url({"DATABASE_URL": "postgresql://b/y"}) == "postgresql://b/y"
    assert resolve_database_url({"SCOREMESH_DATABASE_URL": ""}) is None
    assert resolve_database_url({}) is None


def test_dsn_with_database_keeps_the_rest() -> None:
    assert dsn_with_database("postgresql://postgres@/postgres?host=/tmp/s&port=5432", "t1") == (
        "postgresql://postgres@/t1?host=/tmp/s&port=5432"
    )
    assert dsn_with_database("postgresql://u:p@db:5433", "t2") == "postgresql://u:p@db:5433/t2"
