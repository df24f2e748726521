"""A private PostgreSQL cluster for machines where no database is configured.

``scoremesh up``, a service started without ``SCOREMESH_DATABASE_URL`` and the test suite all
run their own cluster with :class:`EmbeddedPostgres`, from the server binaries that
:func:`find_postgres_bindir` finds: a system PostgreSQL or the ``pgserver`` wheel. It listens on
a unix socket in a private directory and on no TCP port, so it never collides with another
server on the machine (a system one on 5432 included).

Running as root: ``initdb`` refuses to, so the server's programs run as ``nobody``. Its data
directory must then be reachable by ``nobody``; when the requested root is not (a home under
``/root`` is mode 0700), the data lives in ``/var/tmp/scoremesh-postgres/<hash of the root>/``
and the file ``data-location`` inside the requested root says where.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self
from urllib.parse import quote, urlsplit

import asyncpg
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.mesh.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

BINDIR_ENV = "SCOREMESH_POSTGRES_BINDIR"
"""Environment variable naming a directory holding ``initdb``, ``pg_ctl`` and ``postgres``."""

SUPERUSER = "postgres"
PORT = 5432
"""Only names the socket file (``.s.PGSQL.5432``): the server opens no TCP port."""

RELOCATED_BASE = Path("/var/tmp/scoremesh-postgres")
LOCATION_FILE = "data-location"
LOG_FILE = "postgres.log"

_REQUIRED_PROGRAMS = ("initdb", "pg_ctl", "postgres")
# sun_path holds 108 bytes with the terminating NUL
_MAX_SOCKET_PATH = 107
_SOCKET_NAME = f".s.PGSQL.{PORT}"
_SOCKET_DIR_PREFIX = "scoremesh-pg-"
_UNPRIVILEGED_USER = "nobody"
_LOG_TAIL_LINES = 30
_POLL_INTERVAL_S = 0.01

# Settings for a small development or test server; `settings=` overrides them.
DEFAULT_SETTINGS: Mapping[str, str] = {
    "max_connections": "100",
    "shared_buffers": "32MB",
    "max_wal_size": "256MB",
    "fsync": "on",
}


class EmbeddedPostgresError(RuntimeError):
    """The private cluster could not be found, initialized, started or stopped."""


class PostgresNotFound(EmbeddedPostgresError):
    """No PostgreSQL server binaries (``initdb``, ``pg_ctl``, ``postgres``) were found."""


def resolve_database_url(env: Mapping[str, str]) -> str | None:
    """The configured database: ``SCOREMESH_DATABASE_URL``, else ``DATABASE_URL``, else None
    (the caller then runs an :class:`EmbeddedPostgres`). Empty values count as unset."""
    return env.get("SCOREMESH_DATABASE_URL") or env.get("DATABASE_URL") or None


def dsn_with_database(dsn: str, database: str) -> str:
    """``dsn`` pointed at another database on the same server, every other part kept."""
    return urlsplit(dsn)._replace(path="/" + quote(database, safe="")).geturl()


def find_postgres_bindir(env: Mapping[str, str] | None = None) -> Path | None:
    """The directory of the PostgreSQL server programs to use, or None when there is none.

    In order: ``SCOREMESH_POSTGRES_BINDIR`` (returned as given, so a wrong value fails loudly
    at start), ``pg_config --bindir``, the newest ``/usr/lib/postgresql/*/bin`` (Debian and
    Ubuntu), ``initdb`` on PATH (Fedora, Homebrew), the binaries of the ``pgserver`` wheel.
    Candidates other than the explicit one count only if they hold all the server programs:
    ``pg_config`` from a client-only install names a directory without them.
    """
    env = os.environ if env is None else env
    explicit = env.get(BINDIR_ENV)
    if explicit:
        return Path(explicit)
    for candidate in (_pg_config_bindir(), *_debian_bindirs(), _path_bindir(), _pgserver_bindir()):
        if candidate is not None and _has_server_programs(candidate):
            return candidate
    return None


def _has_server_programs(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in _REQUIRED_PROGRAMS)


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out) if out else None


def _debian_bindirs() -> list[Path]:
    def version(path: Path) -> tuple[int, ...]:
        # "9.6" < "15" < "16": numeric, not string, order
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    return sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)


def _path_bindir() -> Path | None:
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _pgserver_bindir() -> Path | None:
    # find_spec locates the package without importing it (its import does work we don't need)
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "pginstall" / "bin"


@dataclass(frozen=True)
class _RunAs:
    """The unprivileged account that runs the server's programs when we are root."""

    uid: int
    gid: int

    @classmethod
    def for_current_process(cls) -> _RunAs | None:
        if os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam(_UNPRIVILEGED_USER)
        except KeyError:
            raise EmbeddedPostgresError(
                f"running as root, PostgreSQL must run as {_UNPRIVILEGED_USER!r}, and there is no such user"
            ) from None
        return cls(entry.pw_uid, entry.pw_gid)

    def can_traverse(self, path: Path) -> bool:
        """Whether this account can reach ``path`` (search permission on it and every parent)."""
        groups = set(os.getgrouplist(_UNPRIVILEGED_USER, self.gid))
        path = path.resolve()
        for directory in (path, *path.parents):
            try:
                info = directory.stat()
            except FileNotFoundError:
                # not created yet: we will create it, readable by all unless the umask says otherwise
                continue
            if info.st_uid == self.uid:
                bit = stat.S_IXUSR
            elif info.st_gid in groups:
                bit = stat.S_IXGRP
            else:
                bit = stat.S_IXOTH
            if not info.st_mode & bit:
                return False
        return True

    def own(self, path: Path) -> None:
        os.chown(path, self.uid, self.gid)


class EmbeddedPostgres:
    """A private PostgreSQL cluster under ``root``, started and stopped by this object.

    ``start()`` creates the cluster on first use (``initdb``: UTF8, C locale, trust
    authentication on the local socket, TCP refused) and starts the server listening on a unix
    socket in a fresh directory under /tmp, and on no TCP port; later starts reuse the data.
    ``stop()`` shuts it down (fast mode: sessions are ended, data is kept). Both block: call
    them through ``asyncio.to_thread`` from a coroutine. Usable as a context manager.

    Layout under ``root``: ``data/`` (the data directory, unless relocated, see the module
    docstring), ``postgres.log`` (initdb, pg_ctl and server output), ``lock`` (held while a
    process owns the cluster, so that two processes never run it at once and a server left
    behind by a process that died is recognised as an orphan and restarted).
    """

    def __init__(
        self,
        root: Path,
        *,
        bindir: Path | None = None,
        settings: Mapping[str, str] | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        """``bindir``: the server programs (default: :func:`find_postgres_bindir`).
        ``settings``: server settings over :data:`DEFAULT_SETTINGS` (a test cluster may turn
        ``fsync`` off). ``timeout_s``: the deadline for initdb, for start and for stop each."""
        self._root = Path(root).absolute()
        self._requested_bindir = bindir
        self._settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self._timeout_s = timeout_s
        self._run_as = _RunAs.for_current_process()
        self._bindir: Path | None = None
        self._socket_dir: Path | None = None
        self._lock: IO[bytes] | None = None

    # the connection, valid while started

    @property
    def host(self) -> str:
        """The directory of the server's unix socket (asyncpg's and libpq's ``host``)."""
        if self._socket_dir is None:
            raise EmbeddedPostgresError("the cluster is not started")
        return str(self._socket_dir)

    @property
    def port(self) -> int:
        return PORT

    @property
    def user(self) -> str:
        return SUPERUSER

    @property
    def dsn(self) -> str:
        """``postgresql://postgres@/postgres?host=/tmp/scoremesh-pg-…&port=5432``, for asyncpg
        and libpq alike; the user is a superuser and needs no password."""
        return f"postgresql://{SUPERUSER}@/postgres?host={quote(self.host, safe='/')}&port={PORT}"

    @property
    def root(self) -> Path:
        return self._root

    @property
    def log_path(self) -> Path:
        return self._root / LOG_FILE

    @property
    def data_dir(self) -> Path:
        """Where the data lives, or will: ``root/data``, or the relocated directory (see the
        module docstring). Computing it changes nothing on disk."""
        location = self._root / LOCATION_FILE
        if location.is_file():
            return Path(location.read_text().strip())
        local = self._root / "data"
        if self._run_as is None or local.is_dir() or self._run_as.can_traverse(self._root):
            return local
        return RELOCATED_BASE / hashlib.sha256(str(self._root).encode()).hexdigest()[:16] / "data"

    @property
    def running(self) -> bool:
        return self._socket_dir is not None

    # lifecycle

    def start(self) -> str:
        """Initializes the cluster if needed, starts the server, waits until it accepts
        connections and returns its DSN. Does nothing but return the DSN if already started.

        Raises :class:`PostgresNotFound` without server programs, :class:`EmbeddedPostgresError`
        (with the tail of the log) when initdb or the server fails or another process runs
        this cluster.
        """
        if self._socket_dir is not None:
            return self.dsn
        bindir = self._find_bindir()
        self._root.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            data_dir = self.data_dir
            self._prepare_relocation(data_dir)
            if not (data_dir / "PG_VERSION").is_file():
                self._initdb(bindir, data_dir)
            self._clear_previous_run(bindir, data_dir)
            socket_dir = self._make_socket_dir()
            try:
                self._start_server(bindir, socket_dir)
            except BaseException:
                shutil.rmtree(socket_dir, ignore_errors=True)
                raise
        except BaseException:
            self._release_lock()
            raise
        self._socket_dir = socket_dir
        log.info("postgres started: data %s, socket %s", data_dir, socket_dir)
        return self.dsn

    def stop(self) -> None:
        """Stops the server this object started (fast shutdown) and waits for it to exit.
        Calling it again, or without a start, does nothing."""
        socket_dir = self._socket_dir
        if socket_dir is None:
            return
        bindir = self._find_bindir()
        self._wait_until_reaped(self.data_dir / "postmaster.pid")
        result = self._pg_ctl(bindir, "stop", "-m", "fast")
        if result.returncode != 0 and self._server_running(bindir, self.data_dir):
            raise EmbeddedPostgresError(self._failure(f"pg_ctl stop failed ({result.returncode})"))
        if result.returncode != 0:
            log.warning("postgres under %s had already stopped", self.data_dir)
        self._socket_dir = None
        shutil.rmtree(socket_dir, ignore_errors=True)
        self._release_lock()
        log.info("postgres stopped: data %s", self.data_dir)

    def destroy(self) -> None:
        """Stops the server and deletes the cluster's data, wherever it lives; the log stays.
        The next ``start()`` creates a new, empty cluster."""
        self.stop()
        if not self._root.is_dir():
            return
        self._acquire_lock()
        try:
            data_dir = self.data_dir
            shutil.rmtree(data_dir, ignore_errors=True)
            if data_dir.parent.parent == RELOCATED_BASE:
                shutil.rmtree(data_dir.parent, ignore_errors=True)
            (self._root / LOCATION_FILE).unlink(missing_ok=True)
        finally:
            self._release_lock()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # steps

    def _find_bindir(self) -> Path:
        if self._bindir is not None:
            return self._bindir
        bindir = self._requested_bindir or find_postgres_bindir()
        if bindir is None:
            raise PostgresNotFound(
                "no PostgreSQL server programs found: install PostgreSQL (Debian/Ubuntu: "
                f"apt-get install postgresql), set {BINDIR_ENV}, install the pgserver wheel, or "
                "configure SCOREMESH_DATABASE_URL"
            )
        missing = [name for name in _REQUIRED_PROGRAMS if not os.access(bindir / name, os.X_OK)]
        if missing:
            raise PostgresNotFound(f"{bindir} lacks the PostgreSQL server programs {', '.join(missing)}")
        if self._run_as is not None and not self._run_as.can_traverse(bindir):
            raise EmbeddedPostgresError(
                f"running as root, PostgreSQL runs as {_UNPRIVILEGED_USER!r}, who cannot reach {bindir}"
            )
        self._bindir = bindir
        return bindir

    def _acquire_lock(self) -> None:
        lock = (self._root / "lock").open("a+b")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().decode(errors="replace").strip() or "?"
            lock.close()
            raise EmbeddedPostgresError(
                f"the cluster under {self._root} is in use by another process (pid {owner})"
            ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()).encode())
        lock.flush()
        self._lock = lock

    def _release_lock(self) -> None:
        if self._lock is not None:
            # closing the file releases the flock
            self._lock.close()
            self._lock = None

    def _prepare_relocation(self, data_dir: Path) -> None:
        """Creates the directories of a data directory relocated under /var/tmp, and the record
        of where it is."""
        location = self._root / LOCATION_FILE
        if data_dir.parent.parent != RELOCATED_BASE or location.is_file():
            return
        with contextlib.suppress(FileExistsError):
            RELOCATED_BASE.mkdir(mode=0o711)
        # /var/tmp is world-writable: refuse a base that someone else created or can write to
        info = RELOCATED_BASE.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise EmbeddedPostgresError(
                f"{RELOCATED_BASE} must be a directory owned by root and writable only by it"
            )
        _prune_orphaned_relocations()
        with contextlib.suppress(FileExistsError):
            data_dir.parent.mkdir(mode=0o711)
        # lets a later run tell an orphan (its root deleted) from a cluster in use
        (data_dir.parent / "root").write_text(f"{self._root}\n")
        location.write_text(f"{data_dir}\n")
        log.info(
            "%s is out of reach of %r: the cluster's data lives in %s",
            self._root,
            _UNPRIVILEGED_USER,
            data_dir,
        )

    def _initdb(self, bindir: Path, data_dir: Path) -> None:
        # initdb works in a side directory that is renamed into place only once complete, so
        # a run killed halfway never leaves a data directory that looks initialized
        staging = data_dir.with_name(data_dir.name + ".initdb")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700, parents=True)
        if self._run_as is not None:
            self._run_as.own(staging)
        started = time.monotonic()
        result = self._run(
            [
                str(bindir / "initdb"),
                "-D",
                str(staging),
                "-U",
                SUPERUSER,
                "--encoding=UTF8",
                "--locale=C",
                "--auth-local=trust",
                "--auth-host=reject",
                "--no-instructions",
            ]
        )
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise EmbeddedPostgresError(self._failure(f"initdb failed ({result.returncode})"))
        staging.rename(data_dir)
        log.info("initialized a PostgreSQL cluster in %s in %.2f s", data_dir, time.monotonic() - started)

    def _clear_previous_run(self, bindir: Path, data_dir: Path) -> None:
        """Stops a server left running by a process that died without stopping it (we hold
        the lock, so no live owner has it), and removes that run's socket directory. A stale
        postmaster.pid needs nothing more: the server replaces it itself."""
        pid_file = data_dir / "postmaster.pid"
        try:
            # postmaster.pid: pid, data directory, start time, port, socket directory, …
            lines = pid_file.read_text().splitlines()
        except FileNotFoundError:
            return
        self._wait_until_reaped(pid_file)
        if self._server_running(bindir, data_dir):
            log.warning("stopping a postgres server left running in %s by a process that died", data_dir)
            if self._pg_ctl(bindir, "stop", "-m", "fast").returncode != 0:
                raise EmbeddedPostgresError(
                    self._failure(f"could not stop the server left running in {data_dir}")
                )
        if len(lines) > 4 and Path(lines[4]).name.startswith(_SOCKET_DIR_PREFIX):
            _remove_socket_dir(Path(lines[4]))

    def _wait_until_reaped(self, pid_file: Path) -> None:
        """Waits for a postmaster that was just killed to be reaped. Until then it is a zombie
        that both pg_ctl and the new server take for a live server; an orphan is reaped by
        PID 1, which in some containers and VMs takes a second or more."""
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        deadline = time.monotonic() + self._timeout_s
        while _is_zombie(pid):
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"the server that ran in {pid_file.parent} (pid {pid}) has exited but was never reaped"
                )
            time.sleep(_POLL_INTERVAL_S)

    def _make_socket_dir(self) -> Path:
        # /tmp rather than $TMPDIR: the socket's path must fit in sun_path
        socket_dir = Path(
            tempfile.mkdtemp(prefix=_SOCKET_DIR_PREFIX, dir="/tmp" if Path("/tmp").is_dir() else None)
        )
        if len(str(socket_dir / _SOCKET_NAME).encode()) > _MAX_SOCKET_PATH:
            shutil.rmtree(socket_dir, ignore_errors=True)
            raise EmbeddedPostgresError(f"socket path under {socket_dir} exceeds {_MAX_SOCKET_PATH} bytes")
        if self._run_as is not None:
            self._run_as.own(socket_dir)
        return socket_dir

    def _start_server(self, bindir: Path, socket_dir: Path) -> None:
        settings = {
            **self._settings,
            "listen_addresses": "",
            "port": str(PORT),
            "unix_socket_directories": str(socket_dir),
        }
        # pg_ctl hands -o to a shell
        options = " ".join(f"-c {shlex.quote(f'{name}={value}')}" for name, value in settings.items())
        started = time.monotonic()
        # -w: pg_ctl polls the server's own readiness report in postmaster.pid until the
        # deadline (-t) and notices a server that exits during start-up
        result = self._pg_ctl(bindir, "start", "-o", options)
        if result.returncode != 0:
            raise EmbeddedPostgresError(self._failure(f"postgres did not start ({result.returncode})"))
        log.debug("postgres accepted connections after %.3f s", time.monotonic() - started)

    def _server_running(self, bindir: Path, data_dir: Path) -> bool:
        # pg_ctl status: 0 running, 3 not running, 4 no data directory
        return self._run([str(bindir / "pg_ctl"), "status", "-D", str(data_dir)]).returncode == 0

    def _pg_ctl(self, bindir: Path, mode: str, *options: str) -> subprocess.CompletedProcess[bytes]:
        # -w -t: wait for the outcome, up to the deadline
        deadline = str(max(1, round(self._timeout_s)))
        return self._run(
            [str(bindir / "pg_ctl"), mode, "-D", str(self.data_dir), "-w", "-t", deadline, *options]
        )

    def _run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[bytes]:
        """Runs one of the server's programs, as ``nobody`` when we are root, its output
        appended to the log. The server that pg_ctl starts inherits the log as its stderr."""
        # PG* variables (PGPORT, PGDATA, …) would override what we pass
        env = {name: value for name, value in os.environ.items() if not name.startswith("PG")}
        run_as = self._run_as
        with self.log_path.open("ab") as out:
            try:
                return subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    # nobody may not be able to reach our working directory
                    cwd="/",
                    umask=0o077,
                    timeout=self._timeout_s + 10,
                    check=False,
                    user=None if run_as is None else run_as.uid,
                    group=None if run_as is None else run_as.gid,
                    extra_groups=None if run_as is None else [],
                )
            except subprocess.TimeoutExpired:
                raise EmbeddedPostgresError(
                    self._failure(f"{Path(argv[0]).name} {argv[1]} timed out")
                ) from None

    def _failure(self, what: str) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
        except OSError:
            lines = []
        tail = "\n".join(f"  {line}" for line in lines)
        return f"{what}; the end of {self.log_path}:\n{tail}"


def _remove_socket_dir(socket_dir: Path) -> None:
    # only what a killed server leaves there, and the directory only if that emptied it
    for name in (_SOCKET_NAME, f"{_SOCKET_NAME}.lock"):
        (socket_dir / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        socket_dir.rmdir()


def _is_zombie(pid: int) -> bool:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # the state follows the command name, which is in parentheses and may contain spaces
    return stat_line.rpartition(")")[2].split()[:1] == ["Z"]


def _prune_orphaned_relocations() -> None:
    """Deletes relocated clusters whose requested root is gone (a deleted test directory, say)
    and whose server is not running, so that they do not pile up under /var/tmp."""
    for parent in RELOCATED_BASE.iterdir():
        record = parent / "root"
        try:
            owner = Path(record.read_text().strip())
        except OSError:
            continue
        if owner.exists() or (parent / "data" / "postmaster.pid").exists():
            continue
        log.info("removing %s: its cluster's root %s no longer exists", parent, owner)
        shutil.rmtree(parent, ignore_errors=True)


@contextlib.asynccontextmanager
async def database(database_url: str | None, home: Path) -> AsyncIterator[str]:
    """``database_url`` when one is configured; otherwise a private cluster under
    ``home/postgres``, started here and stopped when the block exits."""
    if database_url:
        yield database_url
        return
    cluster = EmbeddedPostgres(home / "postgres")
    dsn = await asyncio.to_thread(cluster.start)
    try:
        yield dsn
    finally:
        await asyncio.to_thread(cluster.stop)


# asyncpg raises several types while PostgreSQL restarts or a connection drops
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.TooManyConnectionsError,
    ConnectionError,
    OSError,
)


_tracer = trace.get_tracer(__name__)
_STATEMENT_CHARS: Final = 500


class TracedConnection(asyncpg.Connection):  # type: ignore[misc]
    """A connection whose queries are ``db`` spans, children of the span that runs them. A
    query outside a recorded trace (background flushes, listeners) makes no span: a db span
    alone says nothing and costs an export."""

    async def reset(self, *, timeout: float | None = None) -> None:
        # the pool resets a connection as it is released, sometimes after the request that
        # used it ended: housekeeping, not part of any request's trace
        token = otel_context.attach(otel_context.Context())
        try:
            await super().reset(timeout=timeout)
        finally:
            otel_context.detach(token)

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        with _db_span(query):
            result: str = await super().execute(query, *args, timeout=timeout)
            return result

    async def executemany(self, command: str, args: Any, *, timeout: float | None = None) -> None:
        with _db_span(command):
            await super().executemany(command, args, timeout=timeout)

    async def fetch(
        self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None
    ) -> Any:
        with _db_span(query):
            return await super().fetch(query, *args, timeout=timeout, record_class=record_class)

    async def fetchrow(
        self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None
    ) -> Any:
        with _db_span(query):
            return await super().fetchrow(query, *args, timeout=timeout, record_class=record_class)

    async def fetchval(self, query: str, *args: Any, column: int = 0, timeout: float | None = None) -> Any:
        with _db_span(query):
            return await super().fetchval(query, *args, column=column, timeout=timeout)


@contextlib.contextmanager
def _db_span(query: str) -> Iterator[None]:
    if not trace.get_current_span().is_recording():
        yield
        return
    statement = " ".join(query.split())
    operation = statement.split(" ", 1)[0].upper()
    with _tracer.start_as_current_span(
        operation,
        kind=SpanKind.CLIENT,
        attributes={
            "db.system": "postgresql",
            "db.operation": operation,
            "db.statement": statement[:_STATEMENT_CHARS],
        },
    ):
        yield


@contextlib.asynccontextmanager
async def translated_errors() -> AsyncIterator[None]:
    """Turns a lost or refused database connection into ``Unavailable`` (a store's callers
    should see the mesh's error, not asyncpg's)."""
    try:
        yield
    except CONNECTION_ERRORS as error:
        reason = "DATABASE_UNAVAILABLE"
        raise Unavailable(f"database unavailable: {type(error).__name__}", reason=reason) from error
    except asyncpg.DataError as error:
        # PostgreSQL refused a value (a NUL character in text, NaN in json, a number out of
        # range): the input's fault, though no validation named the field; logged so a
        # missing check can be added
        log.warning("PostgreSQL refused a value: %s: %s", type(error).__name__, error)
        raise InvalidArgument(f"a value cannot be stored: {error}", reason="UNSTORABLE_VALUE") from error
