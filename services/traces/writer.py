"""Commits exported spans to the store from one thread, many exports per transaction.

An export waits until its spans are committed (so a success means they are on disk), but it
does not get a transaction of its own: whatever arrived while the last one was committing is
written together in the next. Under load the batches grow and the commits stay few, and the
event loop never touches SQLite. Spans waiting beyond ``max_pending_spans`` are refused with
UNAVAILABLE, which OTLP exporters retry later, rather than queued without bound.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar

from services.mesh.errors import Unavailable
from services.traces.model import StoredSpan
from services.traces.store import TraceStore

__all__ = ["SpanWriter"]

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_PENDING_SPANS: Final = 100_000
PRUNE_INTERVAL_S: Final = 10.0
CHECKPOINT_INTERVAL_S: Final = 1.0


class SpanWriter:
    """Owns the store's one writing connection and the thread it is used from.

    ``start()`` opens the store and prunes it; ``write()`` waits until spans are committed;
    ``close()`` commits what is pending, then closes the store, even if its caller is
    cancelled meanwhile. A second connection, in a thread of its own, checkpoints the WAL
    into the database at most every ``checkpoint_interval_s`` while spans arrive, so that
    no commit waits for that copy and its fsync.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_spans: int,
        max_age_s: float,
        max_pending_spans: int = MAX_PENDING_SPANS,
        prune_interval_s: float = PRUNE_INTERVAL_S,
        checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
    ) -> None:
        self._path = path
        self._max_spans = max_spans
        self._max_age_s = max_age_s
        self._max_pending_spans = max_pending_spans
        self._prune_interval_s = prune_interval_s
        self._checkpoint_interval_s = checkpoint_interval_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trace-store")
        self._checkpoint_executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="trace-store-checkpoint"
        )
        self._store: TraceStore | None = None
        self._checkpointer: TraceStore | None = None
        self._checkpointing: asyncio.Future[None] | None = None
        self._last_checkpoint = 0.0
        self._pending: list[tuple[Sequence[StoredSpan], asyncio.Future[None]]] = []
        self._pending_spans = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._last_prune = 0.0
        self._added_since_prune = 0

    async def _in_thread(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the span writer already started")
        self._store = await self._in_thread(
            functools.partial(TraceStore.open, self._path, auto_checkpoint=False)
        )
        try:
            await self._in_thread(self._prune)
            self._checkpointer = await asyncio.get_running_loop().run_in_executor(
                self._checkpoint_executor, TraceStore.open, self._path
            )
        except BaseException:  # no connection nor thread left behind
            await self.close()
            raise
        self._task = asyncio.create_task(self._run(), name="trace-store-writer")

    async def write(self, spans: Sequence[StoredSpan]) -> None:
        """Returns once ``spans`` are committed. Unavailable when the writer is closing, is
        too far behind, or the store failed."""
        if self._task is None or self._closing is not None:
            raise Unavailable("the trace store is not accepting spans", reason="TRACE_STORE_CLOSED")
        if not spans:
            return
        if self._pending_spans + len(spans) > self._max_pending_spans:
            raise Unavailable(
                f"{self._pending_spans} spans are waiting to be stored; retry later",
                reason="TRACE_STORE_BEHIND",
            )
        done = asyncio.get_running_loop().create_future()
        self._pending.append((spans, done))
        self._pending_spans += len(spans)
        self._wake.set()
        await done

    async def _run(self) -> None:
        while True:
            if not self._pending:
                if self._closing is not None:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            batch, self._pending, self._pending_spans = self._pending, [], 0
            spans = [span for chunk, _ in batch for span in chunk]
            try:
                added = await self._in_thread(self._add, spans)
            except Exception:
                log.exception("storing %d spans failed", len(spans))
                failed = True
            else:
                failed = False
                log.debug("stored %d new spans of %d", added, len(spans))
                self._checkpoint_if_due()
            for _, done in batch:
                if done.done():  # its caller went away; the spans were written all the same
                    continue
                if failed:
                    done.set_exception(
                        Unavailable("the trace store failed to store the spans", reason="TRACE_STORE_FAILED")
                    )
                else:
                    done.set_result(None)

    def _checkpoint_if_due(self) -> None:
        if self._checkpointing is not None and not self._checkpointing.done():
            return
        now = time.monotonic()
        if now - self._last_checkpoint < self._checkpoint_interval_s:
            return
        self._last_checkpoint = now
        self._checkpointing = asyncio.get_running_loop().run_in_executor(
            self._checkpoint_executor, self._checkpoint
        )

    def _checkpoint(self) -> None:
        assert self._checkpointer is not None
        try:
            self._checkpointer.checkpoint()
        except Exception:  # the spans are committed in the WAL; the next checkpoint copies them
            log.exception("checkpointing %s failed", self._path)

    def _add(self, spans: Sequence[StoredSpan]) -> int:
        assert self._store is not None
        added = self._store.add(spans)
        self._added_since_prune += added
        due = time.monotonic() - self._last_prune >= self._prune_interval_s
        if due or self._added_since_prune >= max(1, self._max_spans // 10):
            try:
                self._prune()
            except Exception:  # the spans are committed; pruning is tried again next time
                log.exception("pruning %s failed", self._path)
        return added

    def _prune(self) -> None:
        assert self._store is not None
        dropped = self._store.prune(max_spans=self._max_spans, max_age_s=self._max_age_s)
        if dropped:
            log.info("dropped the %d oldest traces from %s", dropped, self._path)
        self._last_prune = time.monotonic()
        self._added_since_prune = 0

    async def close(self) -> None:
        """Commits every pending span, then closes the store and its thread. Safe to call
        more than once."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._close(), name="trace-store-close")
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        try:
            if self._task is not None:
                self._wake.set()
                await self._task
        finally:
            if self._checkpointing is not None:
                await asyncio.wait([self._checkpointing])
            checkpointer = self._checkpointer
            if checkpointer is not None:
                await asyncio.get_running_loop().run_in_executor(
                    self._checkpoint_executor, checkpointer.close
                )
            self._checkpoint_executor.shutdown(wait=True)
            # the last connection to close copies the rest of the WAL into the database
            store = self._store
            if store is not None:
                await self._in_thread(store.close)
            self._executor.shutdown(wait=True)
