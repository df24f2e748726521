"""Datasets: files in the training store (content-addressed, like the registry's artifacts),
named per tenant in PostgreSQL.

An upload streams into the store while its sha256 is computed; the file is read (rows,
columns) before its row is written, so a dataset that is listed can be trained on. A name is
bound to its bytes for good: the same bytes under the same name return the dataset stored
before; other bytes under a taken name are ALREADY_EXISTS.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

import asyncpg

from services.mesh import paging
from services.mesh.artifacts import LocalArtifactStore
from services.mesh.errors import (
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    raise_for_violations,
)
from services.mesh.identity import Caller
from services.mesh.postgres import translated_errors

FORMATS: Final = ("csv", "npz")
NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256: Final = re.compile(r"[0-9a-f]{64}")

Inspect = Callable[[Path, str], tuple[int, int]]
"""Reads a dataset file of a format: its (rows, feature columns), or InvalidArgument."""


@dataclass(frozen=True, slots=True)
class Dataset:
    tenant: str
    name: str
    format: str
    sha256: str
    size_bytes: int
    rows: int
    columns: int
    source: str
    created_by: str
    create_time: datetime


@dataclass(frozen=True, slots=True)
class DatasetPage:
    datasets: tuple[Dataset, ...]
    next_page_token: str


def check_upload(name: str, format: str, sha256: str) -> None:
    """INVALID_ARGUMENT naming every bad field of an upload's metadata."""
    violations: list[FieldViolation] = []
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        violations.append(
            FieldViolation("metadata.name", "must be 1 to 128 letters, digits, '.', '_' or '-', not '..'")
        )
    if format not in FORMATS:
        violations.append(FieldViolation("metadata.format", f"must be one of {', '.join(FORMATS)}"))
    if sha256 and not _SHA256.fullmatch(sha256):
        violations.append(FieldViolation("metadata.sha256", "must be 64 lowercase hex characters"))
    raise_for_violations(violations)


def _dataset(row: asyncpg.Record) -> Dataset:
    return Dataset(**dict(row))


_COLUMNS: Final = "tenant, name, format, sha256, size_bytes, rows, columns, source, created_by, create_time"


class DatasetStore:
    def __init__(
        self, pool: asyncpg.Pool, files: LocalArtifactStore, inspect: Inspect, *, max_bytes: int
    ) -> None:
        self._pool = pool
        self._files = files
        self._inspect = inspect
        self._max_bytes = max_bytes

    def path_of(self, dataset: Dataset) -> Path:
        return self._files.path_of(dataset.sha256)

    async def upload(
        self,
        caller: Caller,
        name: str,
        format: str,
        chunks: AsyncIterable[bytes],
        *,
        sha256: str = "",
        source: str = "upload",
    ) -> tuple[Dataset, bool]:
        """Stores the bytes of ``chunks`` as dataset ``name`` of ``caller``'s tenant; returns
        it and whether it is new."""
        check_upload(name, format, sha256)
        async with self._files.upload() as upload:
            async for chunk in chunks:
                if upload.size + len(chunk) > self._max_bytes:
                    raise ResourceExhausted(
                        f"dataset {name!r} is larger than {self._max_bytes} bytes",
                        reason="DATASET_TOO_LARGE",
                        metadata={"limit": str(self._max_bytes)},
                    )
                await upload.write(chunk)
            await upload.flush()
            if sha256 and upload.sha256() != sha256:
                raise InvalidArgument.for_field(
                    "metadata.sha256", f"the bytes received hash to {upload.sha256()}, not {sha256}"
                )
            rows, columns = await asyncio.to_thread(self._inspect, upload.path, format)
            size = upload.size
            digest = await upload.commit()
        return await self._insert(caller, name, format, digest, size, rows, columns, source)

    async def _insert(
        self,
        caller: Caller,
        name: str,
        format: str,
        digest: str,
        size: int,
        rows: int,
        columns: int,
        source: str,
    ) -> tuple[Dataset, bool]:
        async with translated_errors():
            row = await self._pool.fetchrow(
                f"""INSERT INTO datasets (tenant, name, format, sha256, size_bytes, rows, columns,
                        source, created_by)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                    ON CONFLICT (tenant, name) DO NOTHING RETURNING {_COLUMNS}""",
                caller.tenant,
                name,
                format,
                digest,
                size,
                rows,
                columns,
                source,
                caller.principal,
            )
        if row is not None:
            return _dataset(row), True
        existing = await self.get(caller, name)
        if existing.sha256 != digest:
            raise AlreadyExists(
                f"dataset {name!r} exists with other contents; datasets are immutable, pick another name",
                reason="DATASET_EXISTS",
                metadata={"dataset": name},
            )
        return existing, False

    async def get(self, caller: Caller, name: str) -> Dataset:
        async with translated_errors():
            row = await self._pool.fetchrow(
                f"SELECT {_COLUMNS} FROM datasets WHERE tenant = $1 AND name = $2", caller.tenant, name
            )
        if row is None:
            raise NotFound(
                f"no dataset {name!r}", reason="DATASET_NOT_FOUND", metadata={"dataset": name[:128]}
            )
        return _dataset(row)

    async def list(self, caller: Caller, *, page_size: int = 0, page_token: str = "") -> DatasetPage:
        limit = paging.page_size(page_size)
        async with translated_errors():
            rows = await self._pool.fetch(
                f"""SELECT {_COLUMNS} FROM datasets WHERE tenant = $1 AND name > $2
                    ORDER BY name LIMIT $3""",
                caller.tenant,
                page_token,
                limit + 1,
            )
        datasets = tuple(_dataset(row) for row in rows[:limit])
        token = datasets[-1].name if len(rows) > limit else ""
        return DatasetPage(datasets, token)
