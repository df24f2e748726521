"""A response cache: identical requests to one model version get the stored outputs.

Entries are keyed by :class:`CacheKey` — model, version and a digest of the canonical
request (:func:`services.scoring.tensors.canonical_key`) — so a version never answers for
another, and unloading a version drops its entries (:meth:`ResponseCache.evict_version`).
The cache is bounded in bytes and evicts the least recently used entries first.

:meth:`ResponseCache.get_or_compute` also de-duplicates in flight: identical concurrent
requests share one computation, which runs in its own task so that the first caller going
away does not cancel it for the others.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from services.scoring.backend import Array

__all__ = ["ENTRY_OVERHEAD_BYTES", "CacheKey", "CacheStats", "Outputs", "ResponseCache"]

Outputs = dict[str, Array]

ENTRY_OVERHEAD_BYTES = 256
"""What an entry costs besides its arrays' data (dict, key, array headers), roughly."""


class CacheKey(NamedTuple):
    model: str
    version: int
    digest: bytes
    """:func:`services.scoring.tensors.canonical_key` of the inputs and the outputs asked for."""


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    """Lookups answered from the cache."""
    misses: int = 0
    """Lookups that started a computation."""
    shared: int = 0
    """Lookups that joined an identical computation in flight."""
    evictions: int = 0
    """Entries dropped to stay within the byte bound."""
    invalidations: int = 0
    """Entries dropped because their version was unloaded."""
    entries: int = 0
    bytes: int = 0


class _Entry:
    __slots__ = ("outputs", "size")

    def __init__(self, outputs: Outputs, size: int) -> None:
        self.outputs = outputs
        self.size = size


class ResponseCache:
    """An LRU of responses bounded to ``max_bytes`` (0 disables it: nothing is stored and
    :meth:`get_or_compute` just computes). It stores read-only copies: an entry must not
    change under its readers, nor pin the whole batch output its rows were a view of."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        self._max_bytes = max_bytes
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._by_version: dict[tuple[str, int], set[CacheKey]] = {}
        # bumped by evict_version so that computations started before it do not store (for
        # any version: a rare missed store is cheaper than a counter per version ever seen)
        self._generation = 0
        self._inflight: dict[CacheKey, asyncio.Task[Outputs]] = {}
        self.stats = CacheStats()

    @property
    def enabled(self) -> bool:
        return self._max_bytes > 0

    def get(self, key: CacheKey) -> Outputs | None:
        """The stored outputs (a new dict of read-only arrays), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return dict(entry.outputs)

    def put(self, key: CacheKey, outputs: Mapping[str, Array]) -> Outputs:
        """Stores ``outputs`` (unless larger than the whole cache) and returns the read-only
        arrays it stored."""
        if not self.enabled:
            return dict(outputs)
        frozen = _freeze(outputs)
        size = ENTRY_OVERHEAD_BYTES + sum(a.nbytes for a in frozen.values())
        if size > self._max_bytes:
            return frozen
        self._remove(key)
        self._entries[key] = _Entry(frozen, size)
        self._by_version.setdefault((key.model, key.version), set()).add(key)
        self.stats.bytes += size
        self.stats.entries += 1
        while self.stats.bytes > self._max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self.stats.evictions += 1
        return dict(frozen)

    def evict_version(self, model: str, version: int) -> int:
        """Drops every entry of one version (when it is unloaded); returns how many."""
        self._generation += 1
        keys = self._by_version.pop((model, version), set())
        for key in keys:
            entry = self._entries.pop(key)
            self.stats.bytes -= entry.size
            self.stats.entries -= 1
        self.stats.invalidations += len(keys)
        return len(keys)

    async def get_or_compute(self, key: CacheKey, compute: Callable[[], Awaitable[Outputs]]) -> Outputs:
        """The stored outputs for ``key``, or those of ``compute()``, shared with every
        identical call that arrives while it runs. A failure reaches every caller sharing it
        and is not stored. Cancelling a caller leaves the computation running for the rest."""
        if not self.enabled:
            return await compute()
        cached = self.get(key)
        if cached is not None:
            return cached
        task = self._inflight.get(key)
        if task is None:
            self.stats.misses += 1
            task = asyncio.get_running_loop().create_task(self._compute(key, compute, self._generation))
            self._inflight[key] = task
            # a failure nobody waits for any more is not worth an "exception never retrieved"
            task.add_done_callback(_consume_exception)
        else:
            self.stats.shared += 1
        return dict(await asyncio.shield(task))

    async def close(self) -> None:
        """Cancels the computations in flight (call it once no caller waits) and empties the
        cache."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()
        self._entries.clear()
        self._by_version.clear()
        self.stats.entries = self.stats.bytes = 0

    async def _compute(
        self, key: CacheKey, compute: Callable[[], Awaitable[Outputs]], generation: int
    ) -> Outputs:
        try:
            outputs = await compute()
        finally:
            self._inflight.pop(key, None)
        if self._generation != generation:
            return _freeze(outputs)
        return self.put(key, outputs)

    def _remove(self, key: CacheKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self.stats.bytes -= entry.size
        self.stats.entries -= 1
        version_key = (key.model, key.version)
        keys = self._by_version[version_key]
        keys.discard(key)
        if not keys:
            del self._by_version[version_key]


def _freeze(outputs: Mapping[str, Array]) -> Outputs:
    frozen: Outputs = {}
    for name, array in outputs.items():
        stored = array.copy()
        stored.flags.writeable = False
        frozen[name] = stored
    return frozen


def _consume_exception(task: asyncio.Task[Outputs]) -> None:
    if not task.cancelled():
        task.exception()
