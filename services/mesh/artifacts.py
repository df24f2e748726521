"""Content-addressed artifact storage.

An upload is written to a private temporary file while its sha256 is computed, and becomes
visible only through ``commit()``: fsync, then an atomic rename to ``sha256/ab/<digest>``. A
failed or abandoned upload leaves nothing in the store. ``ArtifactStore`` is the small
interface an S3-compatible store can implement later; ``LocalArtifactStore`` keeps files
under ``SCOREMESH_HOME/artifacts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 1024 * 1024


class ArtifactUpload(Protocol):
    """One artifact being written. ``path`` is a local file holding the bytes so far
    (verification reads it before commit)."""

    @property
    def path(self) -> Path: ...

    @property
    def size(self) -> int: ...

    async def write(self, chunk: bytes) -> None: ...

    async def flush(self) -> None:
        """Makes the bytes so far readable through ``path``."""
        ...

    def sha256(self) -> str: ...

    async def commit(self) -> str:
        """Makes the bytes visible under their digest; returns the digest."""
        ...


class ArtifactStore(Protocol):
    def upload(self) -> contextlib.AbstractAsyncContextManager[ArtifactUpload]:
        """A new upload; leaving the context without ``commit()`` discards it."""
        ...

    def read(self, sha256: str, chunk_bytes: int = READ_CHUNK_BYTES) -> AsyncIterator[bytes]: ...

    def uri(self, sha256: str) -> str: ...


class _LocalUpload:
    def __init__(self, store: LocalArtifactStore, path: Path, fd: int) -> None:
        self._store = store
        self._path = path
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._size = 0
        self._committed = False

    @property
    def path(self) -> Path:
        return self._path

    @property
    def size(self) -> int:
        return self._size

    def _write(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self._file.write(chunk)

    async def write(self, chunk: bytes) -> None:
        # hashing and disk writes leave the event loop; chunks stay in order because each
        # write is awaited before the next one starts
        await asyncio.get_running_loop().run_in_executor(self._store.executor, self._write, chunk)
        self._size += len(chunk)

    def sha256(self) -> str:
        return self._hash.hexdigest()

    def _flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    async def flush(self) -> None:
        """Makes the bytes so far readable through ``path`` (verification needs that)."""
        await asyncio.get_running_loop().run_in_executor(self._store.executor, self._flush)

    def _commit(self, digest: str) -> None:
        self._flush()
        self._file.close()
        target = self._store.path_of(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._path, target)
        _fsync_dir(target.parent)

    async def commit(self) -> str:
        digest = self.sha256()
        await asyncio.get_running_loop().run_in_executor(self._store.executor, self._commit, digest)
        self._committed = True
        return digest

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        if not self._committed:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()


class LocalArtifactStore:
    """Artifacts as files: ``root/sha256/ab/<digest>``, uploads in ``root/tmp``."""

    def __init__(self, root: Path, executor: Executor | None = None) -> None:
        self.root = root
        self.executor = executor
        self._tmp = root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        (root / "sha256").mkdir(parents=True, exist_ok=True)

    def path_of(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256

    def uri(self, sha256: str) -> str:
        return self.path_of(sha256).resolve().as_uri()

    @contextlib.asynccontextmanager
    async def upload(self) -> AsyncIterator[_LocalUpload]:
        # the pid in the name lets a restarted registry tell its dead uploads from a live
        # neighbour's (sweep_abandoned_uploads)
        fd, name = tempfile.mkstemp(prefix=f"upload-{os.getpid()}-", dir=self._tmp)
        upload = _LocalUpload(self, Path(name), fd)
        try:
            yield upload
        finally:
            upload.discard()

    async def read(self, sha256: str, chunk_bytes: int = READ_CHUNK_BYTES) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        artifact = await loop.run_in_executor(self.executor, self.path_of(sha256).open, "rb")
        with artifact:
            while chunk := await loop.run_in_executor(self.executor, artifact.read, chunk_bytes):
                yield chunk

    def sweep_abandoned_uploads(self) -> int:
        """Removes temporary files of uploads whose process is gone (a killed registry)."""
        removed = 0
        for path in self._tmp.glob("upload-*"):
            try:
                pid = int(path.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if pid != os.getpid() and not _alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        if removed:
            log.info("removed %s abandoned upload(s) from %s", removed, self._tmp)
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
