"""The span store: one SQLite file under ``$SCOREMESH_HOME/traces``.

One row per span in ``spans`` (unique by trace and span id, so an exporter's retry of a batch
changes nothing), and one per trace in ``traces``, recomputed from its spans whenever a batch
brings new ones: the listing then reads one indexed table. The database runs in WAL mode, so
``scoremesh traces`` reads while the receiver writes, neither waiting for the other.

It is bounded: :meth:`TraceStore.prune` drops whole traces, oldest first, beyond an age and
beyond a span count. Every method blocks; the receiver calls them from its one writer thread,
the CLI directly.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from services.mesh.errors import FailedPrecondition
from services.traces.model import (
    MODEL_ATTRIBUTE,
    SERVICE_PREFIX,
    AttributeValue,
    SpanRecord,
    TraceQuery,
    TraceSummary,
)

__all__ = ["SCHEMA_VERSION", "TraceStore"]

SCHEMA_VERSION: Final = 1
"""``PRAGMA user_version`` of the store this code writes."""

BUSY_TIMEOUT_S: Final = 5.0
# pruning takes the store down to this share of max_spans, so it does not run on every batch
PRUNE_TO: Final = 0.9

_SCHEMA: Final = """
CREATE TABLE spans (
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
    status_message TEXT NOT NULL,
    model TEXT,
    attributes TEXT NOT NULL,
    events TEXT NOT NULL,
    links TEXT NOT NULL
);
CREATE UNIQUE INDEX spans_by_trace ON spans (trace_id, span_id);

CREATE TABLE traces (
    trace_id TEXT PRIMARY KEY,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    span_count INTEGER NOT NULL,
    error_count INTEGER NOT NULL,
    root_span_id TEXT NOT NULL,
    services TEXT NOT NULL,
    models TEXT NOT NULL
);
CREATE INDEX traces_by_start ON traces (start_ns);
"""

_INSERT_SPAN: Final = """
INSERT OR IGNORE INTO spans (trace_id, span_id, parent_span_id, name, kind, service, scope,
    start_ns, end_ns, status_code, status_message, model, attributes, events, links)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

# A trace's row from its spans. The root is the span without a parent, else the earliest whose
# parent is not stored (a caller that does not export, or a span not arrived yet).
_SUMMARIZE: Final = """
INSERT OR REPLACE INTO traces (trace_id, start_ns, end_ns, span_count, error_count, root_span_id,
    services, models)
SELECT s.trace_id, MIN(s.start_ns), MAX(s.end_ns), COUNT(*), SUM(s.status_code = 2),
    (SELECT r.span_id FROM spans r
      WHERE r.trace_id = s.trace_id
      ORDER BY r.parent_span_id = '' OR NOT EXISTS (
          SELECT 1 FROM spans p WHERE p.trace_id = r.trace_id AND p.span_id = r.parent_span_id
      ) DESC, r.start_ns, r.span_id
      LIMIT 1),
    (SELECT json_group_array(service) FROM
        (SELECT DISTINCT service FROM spans WHERE trace_id = s.trace_id ORDER BY service)),
    (SELECT json_group_array(model) FROM
        (SELECT DISTINCT model FROM spans WHERE trace_id = s.trace_id AND model IS NOT NULL
         ORDER BY model))
FROM spans s WHERE s.trace_id = ? GROUP BY s.trace_id
"""

_SUMMARY_COLUMNS: Final = """
t.trace_id, COALESCE(r.name, ''), COALESCE(r.service, ''), t.services, t.span_count, t.error_count,
t.start_ns, t.end_ns
"""

_SPAN_COLUMNS: Final = """
trace_id, span_id, parent_span_id, name, kind, service, scope, start_ns, end_ns, status_code,
status_message, attributes, events, links
"""


# one encoder: json.dumps with options builds a new one per call
_ENCODE: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _dump(value: object) -> str:
    return _ENCODE(value)


def _model_of(span: SpanRecord) -> str | None:
    model = span.attributes.get(MODEL_ATTRIBUTE)
    return model if isinstance(model, str) and model else None


class TraceStore:
    """A connection to the store. :meth:`open` creates it (the receiver), :meth:`open_reader`
    opens an existing one read-only (the CLI). Not thread-safe: use it from one thread."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path

    @classmethod
    def open(cls, path: Path) -> TraceStore:
        """Opens the store at ``path`` for writing, creating it (and its folder, mode 0700)
        if needed. FailedPrecondition when a newer scoremesh wrote it."""
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        connection = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            # WAL with synchronous=NORMAL survives a crash of the process, not of the machine:
            # enough for traces, and each commit is then a write without an fsync
            connection.execute("PRAGMA synchronous=NORMAL")
            with _transaction(connection):
                version = connection.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
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

    def add(self, spans: Sequence[SpanRecord]) -> int:
        """Stores ``spans`` in one transaction, skipping any already stored; returns how many
        were new."""
        if not spans:
            return 0
        with _transaction(self._db, immediate=True):
            before = self._db.total_changes
            self._db.executemany(
                _INSERT_SPAN,
                [
                    (
                        s.trace_id,
                        s.span_id,
                        s.parent_span_id,
                        s.name,
                        s.kind,
                        s.service,
                        s.scope,
                        s.start_ns,
                        s.end_ns,
                        s.status_code,
                        s.status_message,
                        _model_of(s),
                        _dump(s.attributes),
                        _dump(s.events),
                        _dump(s.links),
                    )
                    for s in spans
                ],
            )
            added = self._db.total_changes - before
            if added:
                self._db.executemany(_SUMMARIZE, [(trace_id,) for trace_id in {s.trace_id for s in spans}])
        return added

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
            where.append("EXISTS (SELECT 1 FROM json_each(t.services) WHERE value IN (?, ?))")
            parameters += [query.service, SERVICE_PREFIX + query.service]
        if query.model:
            where.append("EXISTS (SELECT 1 FROM json_each(t.models) WHERE value = ?)")
            parameters.append(query.model)
        if query.failed is not None:
            where.append("t.error_count > 0" if query.failed else "t.error_count = 0")
        order = "t.end_ns - t.start_ns DESC" if query.order == "duration" else "t.start_ns DESC"
        sql = (
            f"SELECT {_SUMMARY_COLUMNS} FROM traces t"
            " LEFT JOIN spans r ON r.trace_id = t.trace_id AND r.span_id = t.root_span_id"
            + (" WHERE " + " AND ".join(where) if where else "")
            + f" ORDER BY {order}, t.trace_id LIMIT ?"
        )
        rows = self._db.execute(sql, [*parameters, query.limit]).fetchall()
        return [
            TraceSummary(
                trace_id=row[0],
                root_name=row[1],
                root_service=row[2],
                services=sorted(json.loads(row[3])),
                span_count=row[4],
                error_count=row[5],
                start_ns=row[6],
                end_ns=row[7],
            )
            for row in rows
        ]

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
        rows = self._db.execute(
            f"SELECT {_SPAN_COLUMNS} FROM spans WHERE trace_id = ? ORDER BY start_ns, span_id", (trace_id,)
        ).fetchall()
        return [
            SpanRecord(
                trace_id=row[0],
                span_id=row[1],
                parent_span_id=row[2],
                name=row[3],
                kind=row[4],
                service=row[5],
                scope=row[6],
                start_ns=row[7],
                end_ns=row[8],
                status_code=row[9],
                status_message=row[10],
                attributes=_load_object(row[11]),
                events=json.loads(row[12]),
                links=json.loads(row[13]),
            )
            for row in rows
        ]

    def count(self) -> tuple[int, int]:
        """How many traces and spans are stored."""
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(span_count), 0) FROM traces").fetchone()
        return int(row[0]), int(row[1])


def _load_object(text: str) -> dict[str, AttributeValue]:
    value = json.loads(text)
    return value if isinstance(value, dict) else {}


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
