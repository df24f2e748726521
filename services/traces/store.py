"""The span store: one SQLite file under ``$SCOREMESH_HOME/traces``.

One row per span in ``spans`` (unique by trace and span id, so an exporter's retry of a batch
changes nothing), holding the columns the listing filters on and the span itself as OTLP
protobuf, read back only when a trace is shown. One row per trace in ``traces`` holds what
the listing sorts and prunes by (times, span and error counts); a trigger keeps it up to date
as spans are inserted, so a write costs little more than its insert. What the listing shows
besides (the root span, the services) is read from the spans of the traces listed, and its
filters by service and model look at the spans of each trace, through the trace index.
The database runs in WAL mode, so ``scoremesh traces`` reads while the receiver writes,
neither waiting for the other.

It is bounded: :meth:`TraceStore.prune` drops whole traces, oldest first, beyond an age and
beyond a span count. Every method blocks; the receiver calls them from its one writer thread,
the CLI directly.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from services.mesh.errors import FailedPrecondition
from services.traces.model import SERVICE_PREFIX, SpanRecord, StoredSpan, TraceQuery, TraceSummary
from services.traces.otlp import span_record

__all__ = ["SCHEMA_VERSION", "TraceStore"]

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 2
"""``PRAGMA user_version`` of the store this code writes. Version 1 (before 2026-12-08) kept
attributes as JSON and summarised each trace on every write; a writer replaces such a store."""

BUSY_TIMEOUT_S: Final = 5.0
# pruning takes the store down to this share of max_spans, so it does not run on every batch
PRUNE_TO: Final = 0.9

_SCHEMA: Final = (
    """CREATE TABLE spans (
        trace_id TEXT NOT NULL,
        span_id TEXT NOT NULL,
        parent_span_id TEXT NOT NULL,
        name TEXT NOT NULL,
        kind INTEGER NOT NULL,
        service TEXT NOT NULL,
        scope TEXT NOT NULL,
        start_ns INTEGER NOT NULL,
        end_ns INTEGER NOT NULL,
        status_code INTEGER NOT NULL,
        model TEXT,
        otlp BLOB NOT NULL
    )""",
    "CREATE UNIQUE INDEX spans_by_trace ON spans (trace_id, span_id)",
    """CREATE TABLE traces (
        trace_id TEXT PRIMARY KEY,
        start_ns INTEGER NOT NULL,
        end_ns INTEGER NOT NULL,
        span_count INTEGER NOT NULL,
        error_count INTEGER NOT NULL
    )""",
    "CREATE INDEX traces_by_start ON traces (start_ns)",
    # fires for new spans only: INSERT OR IGNORE skips a retried one before any trigger runs
    """CREATE TRIGGER spans_summarised AFTER INSERT ON spans BEGIN
        INSERT INTO traces (trace_id, start_ns, end_ns, span_count, error_count)
        VALUES (new.trace_id, new.start_ns, new.end_ns, 1, new.status_code = 2)
        ON CONFLICT (trace_id) DO UPDATE SET
            start_ns = min(start_ns, excluded.start_ns),
            end_ns = max(end_ns, excluded.end_ns),
            span_count = span_count + 1,
            error_count = error_count + excluded.error_count;
    END""",
)
_TABLES: Final = ("spans", "traces")

_INSERT_SPAN: Final = f"""
INSERT OR IGNORE INTO spans ({", ".join(StoredSpan._fields)})
VALUES ({", ".join("?" * len(StoredSpan._fields))})
"""

_TRACE_COLUMNS: Final = "t.trace_id, t.span_count, t.error_count, t.start_ns, t.end_ns"

# The root is the span without a parent, else the earliest whose parent is not stored (a
# caller that does not export, or a span not arrived yet).
_ROOT: Final = """
SELECT r.name, r.service FROM spans r
WHERE r.trace_id = ?
ORDER BY r.parent_span_id = '' OR NOT EXISTS (
    SELECT 1 FROM spans p WHERE p.trace_id = r.trace_id AND p.span_id = r.parent_span_id
) DESC, r.start_ns, r.span_id
LIMIT 1
"""

_SERVICES: Final = "SELECT DISTINCT service FROM spans WHERE trace_id = ? ORDER BY service"

_SPANS: Final = f"""
SELECT {", ".join(StoredSpan._fields)} FROM spans WHERE trace_id = ? ORDER BY start_ns, span_id
"""


class TraceStore:
    """A connection to the store. :meth:`open` creates it (the receiver), :meth:`open_reader`
    opens an existing one read-only (the CLI). Not thread-safe: use it from one thread."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path

    @classmethod
    def open(cls, path: Path, *, auto_checkpoint: bool = True) -> TraceStore:
        """Opens the store at ``path`` for writing, creating it (and its folder, mode 0700)
        if needed. FailedPrecondition when a newer scoremesh wrote it.

        Without ``auto_checkpoint`` its commits never copy the WAL into the database, which
        SQLite otherwise does in the commit that fills the WAL past 1000 pages, fsync
        included (100-400 ms on a busy machine, during which exports wait): the owner then
        calls :meth:`checkpoint` from another connection, as the receiver does."""
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        connection = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            # WAL with synchronous=NORMAL survives a crash of the process, not of the machine:
            # enough for traces, and each commit is then a write without an fsync
            connection.execute("PRAGMA synchronous=NORMAL")
            if not auto_checkpoint:
                connection.execute("PRAGMA wal_autocheckpoint=0")
            with _transaction(connection):
                version = connection.execute("PRAGMA user_version").fetchone()[0]
                if 0 < version < SCHEMA_VERSION:
                    _drop_older(connection, path, version)
                    version = 0
                if version == 0:
                    for statement in _SCHEMA:
                        connection.execute(statement)
                    connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                elif version != SCHEMA_VERSION:
                    raise FailedPrecondition(
                        f"{path} holds trace store version {version}; this scoremesh reads "
                        f"version {SCHEMA_VERSION}: remove the folder, or use the scoremesh that wrote it"
                    )
        except BaseException:
            connection.close()
            raise
        return cls(connection, path)

    @classmethod
    def open_reader(cls, path: Path) -> TraceStore | None:
        """Opens an existing store read-only; None when there is none yet."""
        if not path.exists():
            return None
        connection = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None
        )
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if 0 < version < SCHEMA_VERSION:
            connection.close()
            raise FailedPrecondition(
                f"{path} holds trace store version {version}, written by an older scoremesh; "
                "the local receiver replaces it with an empty one when it next starts (scoremesh up)"
            )
        if version not in (0, SCHEMA_VERSION):
            connection.close()
            raise FailedPrecondition(f"{path} holds trace store version {version}, not {SCHEMA_VERSION}")
        if version == 0:  # created, but no schema yet: as good as empty
            connection.close()
            return None
        return cls(connection, path)

    def close(self) -> None:
        self._db.close()

    # writing

    def add(self, spans: Sequence[StoredSpan]) -> int:
        """Stores ``spans`` in one transaction, skipping any already stored; returns how many
        were new."""
        if not spans:
            return 0
        with _transaction(self._db, immediate=True):
            # rowcount counts the inserts themselves, not the trigger's updates of traces
            return self._db.executemany(_INSERT_SPAN, spans).rowcount

    def checkpoint(self) -> None:
        """Copies what the WAL holds into the database, as far as readers allow, without
        waiting for the writer or making it wait (SQLite's PASSIVE checkpoint)."""
        self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def prune(self, *, max_spans: int, max_age_s: float, now_ns: int | None = None) -> int:
        """Drops traces that started more than ``max_age_s`` ago and, while more than
        ``max_spans`` spans are stored, the oldest traces down to nine tenths of it. Returns
        how many traces it dropped."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        with _transaction(self._db, immediate=True):
            cutoff = now_ns - int(max_age_s * 1e9)
            total = self._db.execute("SELECT COALESCE(SUM(span_count), 0) FROM traces").fetchone()[0]
            if total > max_spans:
                # the newest traces that fit in PRUNE_TO of the budget stay; the rest go
                row = self._db.execute(
                    """SELECT start_ns FROM (
                           SELECT start_ns,
                               SUM(span_count) OVER (ORDER BY start_ns DESC, trace_id DESC) AS kept
                           FROM traces)
                       WHERE kept > ? ORDER BY start_ns DESC LIMIT 1""",
                    (int(max_spans * PRUNE_TO),),
                ).fetchone()
                if row is not None:
                    cutoff = max(cutoff, row[0] + 1)
            doomed = "SELECT trace_id FROM traces WHERE start_ns < ?"
            self._db.execute(f"DELETE FROM spans WHERE trace_id IN ({doomed})", (cutoff,))
            return self._db.execute("DELETE FROM traces WHERE start_ns < ?", (cutoff,)).rowcount

    # reading

    def traces(self, query: TraceQuery) -> list[TraceSummary]:
        """The traces ``query`` selects, in its order, at most ``query.limit``."""
        where: list[str] = []
        parameters: list[Any] = []
        if query.since_ns is not None:
            where.append("t.start_ns >= ?")
            parameters.append(query.since_ns)
        if query.service:
            where.append(
                "EXISTS (SELECT 1 FROM spans s WHERE s.trace_id = t.trace_id AND s.service IN (?, ?))"
            )
            parameters += [query.service, SERVICE_PREFIX + query.service]
        if query.model:
            where.append("EXISTS (SELECT 1 FROM spans s WHERE s.trace_id = t.trace_id AND s.model = ?)")
            parameters.append(query.model)
        if query.failed is not None:
            where.append("t.error_count > 0" if query.failed else "t.error_count = 0")
        order = "t.end_ns - t.start_ns DESC" if query.order == "duration" else "t.start_ns DESC"
        sql = (
            f"SELECT {_TRACE_COLUMNS} FROM traces t"
            + (" WHERE " + " AND ".join(where) if where else "")
            + f" ORDER BY {order}, t.trace_id LIMIT ?"
        )
        rows = self._db.execute(sql, [*parameters, query.limit]).fetchall()
        return [self._summary(*row) for row in rows]

    def _summary(
        self, trace_id: str, span_count: int, error_count: int, start_ns: int, end_ns: int
    ) -> TraceSummary:
        root = self._db.execute(_ROOT, (trace_id,)).fetchone()
        services = [row[0] for row in self._db.execute(_SERVICES, (trace_id,))]
        return TraceSummary(
            trace_id=trace_id,
            root_name=root[0] if root else "",
            root_service=root[1] if root else "",
            services=services,
            span_count=span_count,
            error_count=error_count,
            start_ns=start_ns,
            end_ns=end_ns,
        )

    def resolve(self, prefix: str) -> list[str]:
        """The stored trace ids that start with ``prefix`` (lowercase hex), at most two: one
        means the prefix names a trace."""
        rows = self._db.execute(
            "SELECT trace_id FROM traces WHERE trace_id >= ? AND trace_id < ? ORDER BY trace_id LIMIT 2",
            (prefix, prefix + "g"),
        ).fetchall()
        return [row[0] for row in rows]

    def spans(self, trace_id: str) -> list[SpanRecord]:
        """Every stored span of the trace, by start time; empty when there is none."""
        return [span_record(StoredSpan(*row)) for row in self._db.execute(_SPANS, (trace_id,))]

    def count(self) -> tuple[int, int]:
        """How many traces and spans are stored."""
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(span_count), 0) FROM traces").fetchone()
        return int(row[0]), int(row[1])


def _drop_older(connection: sqlite3.Connection, path: Path, version: int) -> None:
    # a local, bounded cache of recent traces: replaced rather than converted
    traces = connection.execute("SELECT COUNT(*) FROM traces").fetchone()[0]
    for table in _TABLES:
        connection.execute(f"DROP TABLE IF EXISTS {table}")
    log.warning(
        "%s held trace store version %d from an older scoremesh; replaced it with an empty "
        "version %d store (%d traces dropped)",
        path,
        version,
        SCHEMA_VERSION,
        traces,
    )


@contextmanager
def _transaction(connection: sqlite3.Connection, *, immediate: bool = False) -> Iterator[None]:
    # isolation_level=None: the module opens no transactions itself, these are the only ones
    connection.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
