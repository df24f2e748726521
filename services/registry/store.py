"""The registry's PostgreSQL adapter (asyncpg).

Database errors are translated here: callers see domain errors or domain objects only.
Every change that WatchModels announces writes a ``model_events`` row and a NOTIFY in the
same transaction, so an event exists exactly when its change committed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import asyncpg

from services.mesh.errors import AlreadyExists, FailedPrecondition, NotFound
from services.mesh.migrations import migrated_pool
from services.mesh.notify import EventListener
from services.mesh.postgres import translated_errors
from services.registry.domain import (
    Alias,
    AliasChange,
    EventType,
    Model,
    ModelCard,
    ModelEvent,
    ModelVersion,
    Signature,
    TensorSpec,
    Threshold,
    VerificationCheck,
    VerificationReport,
    VersionStatus,
    Visibility,
)

log = logging.getLogger(__name__)

EVENTS_CHANNEL = "scoremesh_model_events"
# held to commit by every transaction that writes an event: ids then grow in commit order
_EVENTS_LOCK = 0x5C0E_0001

_MODEL_COLUMNS = """
    m.name, m.tenant, m.description, m.visibility, m.create_time, m.created_by,
    (SELECT coalesce(max(v.version), 0) FROM model_versions v WHERE v.model_id = m.id)
        AS latest_version
"""
_VERSION_COLUMNS = """
    m.name AS model, v.version, v.sha256, v.size_bytes, v.signature, v.status, v.report,
    v.create_time, v.created_by
"""


def _signature_to_json(signature: Signature) -> dict[str, Any]:
    def specs(items: Sequence[TensorSpec]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {"inputs": specs(signature.inputs), "outputs": specs(signature.outputs)}


def _signature_from_json(data: Mapping[str, Any]) -> Signature:
    def specs(items: Sequence[Mapping[str, Any]]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t["name"], t["datatype"], tuple(t["shape"])) for t in items)

    return Signature(inputs=specs(data["inputs"]), outputs=specs(data["outputs"]))


def _report_to_json(report: VerificationReport) -> dict[str, Any]:
    return {
        "opset": report.opset,
        "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in report.checks],
    }


def _report_from_json(data: Mapping[str, Any]) -> VerificationReport:
    checks = tuple(VerificationCheck(c["name"], c["passed"], c.get("detail", "")) for c in data["checks"])
    return VerificationReport(checks=checks, opset=int(data.get("opset", 0)))


def _model(row: asyncpg.Record) -> Model:
    return Model(
        name=row["name"],
        tenant=row["tenant"],
        description=row["description"],
        visibility=Visibility(row["visibility"]),
        create_time=row["create_time"],
        created_by=row["created_by"],
        latest_version=row["latest_version"],
    )


def _version(row: asyncpg.Record, prefix: str = "") -> ModelVersion:
    """``prefix`` names the row's create_time and created_by columns when a query also
    selects the model's."""
    return ModelVersion(
        model=row["model"],
        version=row["version"],
        sha256=row["sha256"],
        size_bytes=row["size_bytes"],
        signature=_signature_from_json(row["signature"]),
        status=VersionStatus(row["status"]),
        report=_report_from_json(row["report"]),
        create_time=row[f"{prefix}create_time"],
        created_by=row[f"{prefix}created_by"],
    )


def _alias(row: asyncpg.Record) -> Alias:
    return Alias(
        model=row["model"],
        alias=row["alias"],
        version=row["version"],
        update_time=row["update_time"],
        updated_by=row["updated_by"],
    )


def _event(row: asyncpg.Record) -> ModelEvent:
    return ModelEvent(
        cursor=row["id"],
        type=EventType(row["type"]),
        model=row["model"],
        version=row["version"],
        alias=row["alias"],
        previous_version=row["previous_version"],
        actor=row["actor"],
        create_time=row["create_time"],
    )


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class RegistryStore:
    """Models, versions, aliases, cards and events in PostgreSQL."""

    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self._pool = pool
        self._dsn = dsn

    @classmethod
    async def open(cls, dsn: str, *, min_size: int = 2, max_size: int = 10) -> RegistryStore:
        """Connects, applies pending migrations (safe with several replicas starting at once)."""
        pool = await migrated_pool(
            dsn,
            component="registry",
            package="services.registry.migrations",
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
        )
        return cls(pool, dsn)

    async def close(self) -> None:
        await self._pool.close()

    # models

    async def get_model(self, name: str) -> Model | None:
        async with translated_errors():
            row = await self._pool.fetchrow(f"SELECT {_MODEL_COLUMNS} FROM models m WHERE m.name = $1", name)
        return _model(row) if row else None

    async def list_models(self, tenant: str, after_name: str, limit: int) -> list[Model]:
        async with translated_errors():
            rows = await self._pool.fetch(
                f"""SELECT {_MODEL_COLUMNS} FROM models m
                    WHERE (m.tenant = $1 OR m.visibility = 'public') AND m.name > $2
                    ORDER BY m.name LIMIT $3""",
                tenant,
                after_name,
                limit,
            )
        return [_model(row) for row in rows]

    async def create_model(
        self, name: str, tenant: str, description: str, visibility: Visibility, created_by: str
    ) -> Model:
        async with translated_errors():
            try:
                await self._pool.execute(
                    """INSERT INTO models (name, tenant, description, visibility, created_by)
                       VALUES ($1, $2, $3, $4, $5)""",
                    name,
                    tenant,
                    description,
                    visibility.value,
                    created_by,
                )
            except asyncpg.UniqueViolationError as error:
                raise AlreadyExists(f"model {name!r} already exists", reason="MODEL_EXISTS") from error
        model = await self.get_model(name)
        assert model is not None
        return model

    async def update_model(self, name: str, description: str | None, visibility: Visibility | None) -> Model:
        async with translated_errors():
            status = await self._pool.execute(
                """UPDATE models SET description = coalesce($2, description),
                                     visibility = coalesce($3, visibility)
                   WHERE name = $1""",
                name,
                description,
                visibility.value if visibility else None,
            )
        if status == "UPDATE 0":
            raise NotFound(f"model {name!r} not found", reason="MODEL_NOT_FOUND")
        model = await self.get_model(name)
        assert model is not None
        return model

    # versions

    async def find_version_by_sha256(self, model: str, sha256: str) -> ModelVersion | None:
        async with translated_errors():
            row = await self._pool.fetchrow(
                f"""SELECT {_VERSION_COLUMNS} FROM model_versions v JOIN models m ON m.id = v.model_id
                    WHERE m.name = $1 AND v.sha256 = $2""",
                model,
                sha256,
            )
        return _version(row) if row else None

    async def create_version(
        self,
        *,
        model: str,
        tenant: str,
        description: str,
        actor: str,
        sha256: str,
        size_bytes: int,
        signature: Signature,
        status: VersionStatus,
        report: VerificationReport,
        check_owner: Callable[[Model], None],
    ) -> tuple[ModelVersion, bool]:
        """Adds the next version of ``model`` (created for ``tenant`` if missing), or returns
        the version that already holds these bytes. ``check_owner`` may raise to refuse a
        model another tenant created meanwhile. Concurrent pushes serialize on the model row."""
        async with translated_errors(), self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """INSERT INTO models (name, tenant, description, visibility, created_by)
                   VALUES ($1, $2, $3, 'private', $4) ON CONFLICT (name) DO NOTHING""",
                model,
                tenant,
                description,
                actor,
            )
            model_id = await conn.fetchval("SELECT id FROM models WHERE name = $1 FOR UPDATE", model)
            owner = await conn.fetchrow(f"SELECT {_MODEL_COLUMNS} FROM models m WHERE m.id = $1", model_id)
            check_owner(_model(owner))
            existing = await conn.fetchrow(
                f"""SELECT {_VERSION_COLUMNS} FROM model_versions v JOIN models m ON m.id = v.model_id
                    WHERE v.model_id = $1 AND v.sha256 = $2""",
                model_id,
                sha256,
            )
            if existing:
                return _version(existing), False
            version = await conn.fetchval(
                "SELECT coalesce(max(version), 0) + 1 FROM model_versions WHERE model_id = $1", model_id
            )
            await conn.execute(
                """INSERT INTO model_versions
                       (model_id, version, sha256, size_bytes, signature, status, report, created_by)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
                model_id,
                version,
                sha256,
                size_bytes,
                _signature_to_json(signature),
                status.value,
                _report_to_json(report),
                actor,
            )
            await self._emit(conn, EventType.VERSION_CREATED, model, actor, version=version)
            row = await conn.fetchrow(
                f"""SELECT {_VERSION_COLUMNS} FROM model_versions v JOIN models m ON m.id = v.model_id
                    WHERE v.model_id = $1 AND v.version = $2""",
                model_id,
                version,
            )
        return _version(row), True

    async def resolve(
        self, model: str, version: int | None, alias: str
    ) -> tuple[Model | None, ModelVersion | None]:
        """The model and the version that ``version`` (or else ``alias``) names, in one query."""
        async with translated_errors():
            row = await self._pool.fetchrow(
                f"""SELECT {_MODEL_COLUMNS}, m.name AS model, v.version, v.sha256, v.size_bytes,
                           v.signature, v.status, v.report, v.create_time AS version_create_time,
                           v.created_by AS version_created_by
                    FROM models m
                    LEFT JOIN aliases a ON a.model_id = m.id AND a.alias = $3
                    LEFT JOIN model_versions v
                           ON v.model_id = m.id AND v.version = coalesce($2::bigint, a.version)
                    WHERE m.name = $1""",
                model,
                version,
                alias,
            )
        if row is None:
            return None, None
        if row["version"] is None:
            return _model(row), None
        return _model(row), _version(row, prefix="version_")

    async def get_version(self, model: str, version: int) -> ModelVersion | None:
        async with translated_errors():
            row = await self._pool.fetchrow(
                f"""SELECT {_VERSION_COLUMNS} FROM model_versions v JOIN models m ON m.id = v.model_id
                    WHERE m.name = $1 AND v.version = $2""",
                model,
                version,
            )
        return _version(row) if row else None

    async def list_versions(self, model: str, before_version: int | None, limit: int) -> list[ModelVersion]:
        async with translated_errors():
            rows = await self._pool.fetch(
                f"""SELECT {_VERSION_COLUMNS} FROM model_versions v JOIN models m ON m.id = v.model_id
                    WHERE m.name = $1 AND ($2::bigint IS NULL OR v.version < $2)
                    ORDER BY v.version DESC LIMIT $3""",
                model,
                before_version,
                limit,
            )
        return [_version(row) for row in rows]

    # aliases

    async def set_alias(
        self, model: str, alias: str, version: int, expected_version: int | None, actor: str
    ) -> Alias:
        """Points ``alias`` at a READY ``version``; with ``expected_version`` only if the
        alias points there now (0: only if it does not exist). Moves of one model's aliases
        serialize on the model row, so of two moves expecting the same version one fails."""
        async with translated_errors(), self._pool.acquire() as conn, conn.transaction():
            model_id = await self._lock_model(conn, model)
            target = await conn.fetchval(
                "SELECT status FROM model_versions WHERE model_id = $1 AND version = $2", model_id, version
            )
            if target is None:
                raise NotFound(f"model {model!r} has no version {version}", reason="VERSION_NOT_FOUND")
            if target != VersionStatus.READY.value:
                raise FailedPrecondition(
                    f"version {version} of {model!r} failed verification and cannot be aliased",
                    reason="VERSION_NOT_READY",
                )
            current = await self._current_alias(conn, model_id, alias, expected_version)
            await conn.execute(
                """INSERT INTO aliases (model_id, alias, version, updated_by) VALUES ($1, $2, $3, $4)
                   ON CONFLICT (model_id, alias)
                   DO UPDATE SET version = $3, updated_by = $4, update_time = now()""",
                model_id,
                alias,
                version,
                actor,
            )
            await self._audit(conn, model_id, model, alias, current, version, actor)
            row = await conn.fetchrow(
                """SELECT $3::text AS model, alias, version, update_time, updated_by FROM aliases
                   WHERE model_id = $1 AND alias = $2""",
                model_id,
                alias,
                model,
            )
        return _alias(row)

    async def delete_alias(self, model: str, alias: str, expected_version: int | None, actor: str) -> None:
        async with translated_errors(), self._pool.acquire() as conn, conn.transaction():
            model_id = await self._lock_model(conn, model)
            current = await self._current_alias(conn, model_id, alias, expected_version)
            if current == 0:
                raise NotFound(f"model {model!r} has no alias {alias!r}", reason="ALIAS_NOT_FOUND")
            await conn.execute("DELETE FROM aliases WHERE model_id = $1 AND alias = $2", model_id, alias)
            await self._audit(conn, model_id, model, alias, current, 0, actor)

    async def list_aliases(self, model: str) -> list[Alias]:
        async with translated_errors():
            rows = await self._pool.fetch(
                """SELECT m.name AS model, a.alias, a.version, a.update_time, a.updated_by
                   FROM aliases a JOIN models m ON m.id = a.model_id
                   WHERE m.name = $1 ORDER BY a.alias""",
                model,
            )
        return [_alias(row) for row in rows]

    async def get_alias(self, model: str, alias: str) -> Alias | None:
        async with translated_errors():
            row = await self._pool.fetchrow(
                """SELECT m.name AS model, a.alias, a.version, a.update_time, a.updated_by
                   FROM aliases a JOIN models m ON m.id = a.model_id
                   WHERE m.name = $1 AND a.alias = $2""",
                model,
                alias,
            )
        return _alias(row) if row else None

    async def list_alias_changes(
        self, model: str, alias: str, before_id: int | None, limit: int
    ) -> list[tuple[int, AliasChange]]:
        async with translated_errors():
            rows = await self._pool.fetch(
                """SELECT c.id, m.name AS model, c.alias, c.from_version, c.to_version, c.actor,
                          c.create_time
                   FROM alias_changes c JOIN models m ON m.id = c.model_id
                   WHERE m.name = $1 AND ($2 = '' OR c.alias = $2)
                     AND ($3::bigint IS NULL OR c.id < $3)
                   ORDER BY c.id DESC LIMIT $4""",
                model,
                alias,
                before_id,
                limit,
            )
        return [
            (
                row["id"],
                AliasChange(
                    model=row["model"],
                    alias=row["alias"],
                    from_version=row["from_version"],
                    to_version=row["to_version"],
                    actor=row["actor"],
                    create_time=row["create_time"],
                ),
            )
            for row in rows
        ]

    async def _lock_model(self, conn: asyncpg.Connection, model: str) -> int:
        model_id: int | None = await conn.fetchval("SELECT id FROM models WHERE name = $1 FOR UPDATE", model)
        if model_id is None:
            raise NotFound(f"model {model!r} not found", reason="MODEL_NOT_FOUND")
        return model_id

    async def _current_alias(
        self, conn: asyncpg.Connection, model_id: int, alias: str, expected_version: int | None
    ) -> int:
        current: int = (
            await conn.fetchval(
                "SELECT version FROM aliases WHERE model_id = $1 AND alias = $2", model_id, alias
            )
            or 0
        )
        if expected_version is not None and current != expected_version:
            raise FailedPrecondition(
                f"alias {alias!r} points at version {current or 'none'}, not {expected_version or 'none'}",
                reason="ALIAS_CHANGED",
                metadata={"current_version": str(current), "expected_version": str(expected_version)},
            )
        return current

    async def _audit(
        self,
        conn: asyncpg.Connection,
        model_id: int,
        model: str,
        alias: str,
        from_version: int,
        to_version: int,
        actor: str,
    ) -> None:
        await conn.execute(
            """INSERT INTO alias_changes (model_id, alias, from_version, to_version, actor)
               VALUES ($1, $2, $3, $4, $5)""",
            model_id,
            alias,
            from_version,
            to_version,
            actor,
        )
        event = EventType.ALIAS_SET if to_version else EventType.ALIAS_DELETED
        await self._emit(
            conn, event, model, actor, version=to_version, alias=alias, previous_version=from_version
        )

    # model cards

    async def get_card(self, model: str, version: int) -> ModelCard | None:
        async with translated_errors():
            row = await self._pool.fetchrow(
                """SELECT c.metrics, c.thresholds, c.description, c.update_time
                   FROM model_cards c JOIN models m ON m.id = c.model_id
                   WHERE m.name = $1 AND c.version = $2""",
                model,
                version,
            )
        if row is None:
            return None
        return ModelCard(
            model=model,
            version=version,
            metrics=row["metrics"],
            thresholds=tuple(
                Threshold(t["output"], t["value"], t.get("metrics", {})) for t in row["thresholds"]
            ),
            description=row["description"],
            update_time=row["update_time"],
        )

    async def put_card(self, card: ModelCard, actor: str) -> ModelCard:
        thresholds = [
            {"output": t.output, "value": t.value, "metrics": dict(t.metrics)} for t in card.thresholds
        ]
        async with translated_errors():
            status = await self._pool.execute(
                """INSERT INTO model_cards (model_id, version, metrics, thresholds, description, updated_by)
                   SELECT v.model_id, v.version, $3, $4, $5, $6
                   FROM model_versions v JOIN models m ON m.id = v.model_id
                   WHERE m.name = $1 AND v.version = $2
                   ON CONFLICT (model_id, version) DO UPDATE
                   SET metrics = $3, thresholds = $4, description = $5, updated_by = $6,
                       update_time = now()""",
                card.model,
                card.version,
                dict(card.metrics),
                thresholds,
                card.description,
                actor,
            )
        if status == "INSERT 0 0":
            raise NotFound(f"model {card.model!r} has no version {card.version}", reason="VERSION_NOT_FOUND")
        stored = await self.get_card(card.model, card.version)
        assert stored is not None
        return stored

    # events

    async def _emit(
        self,
        conn: asyncpg.Connection,
        event: EventType,
        model: str,
        actor: str,
        *,
        version: int = 0,
        alias: str = "",
        previous_version: int = 0,
    ) -> None:
        # last statement of its transaction: the lock is held only until the commit
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _EVENTS_LOCK)
        event_id = await conn.fetchval(
            """INSERT INTO model_events (type, model, version, alias, previous_version, actor)
               VALUES ($1, $2, $3, $4, $5, $6) RETURNING id""",
            event.value,
            model,
            version,
            alias,
            previous_version,
            actor,
        )
        await conn.execute("SELECT pg_notify($1, $2)", EVENTS_CHANNEL, str(event_id))

    async def head_cursor(self) -> int:
        async with translated_errors():
            head: int = await self._pool.fetchval("SELECT coalesce(max(id), 0) FROM model_events")
        return head

    async def events_after(self, cursor: int, models: Sequence[str], limit: int) -> list[ModelEvent]:
        async with translated_errors():
            rows = await self._pool.fetch(
                """SELECT id, type, model, version, alias, previous_version, actor, create_time
                   FROM model_events
                   WHERE id > $1 AND (cardinality($2::text[]) = 0 OR model = ANY($2::text[]))
                   ORDER BY id LIMIT $3""",
                cursor,
                list(models),
                limit,
            )
        return [_event(row) for row in rows]


def event_listener(dsn: str) -> EventListener:
    """The registry's change stream: woken by NOTIFY on :data:`EVENTS_CHANNEL` with the new
    event id; ``model_events`` holds the events themselves."""
    return EventListener(
        dsn, EVENTS_CHANNEL, "SELECT coalesce(max(id), 0) FROM model_events", name="registry-events"
    )
