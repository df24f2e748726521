"""Per-key rate limits and usage counters, kept off the database on the request path.

* :class:`TokenBucket` and :class:`RateLimiter`: a bucket per API key, in memory. A gateway
  answers a request the bucket refuses with 429 and ``Retry-After: retry_after_seconds(wait)``.
  Each gateway process limits on its own: with N replicas behind a balancer a key gets up to N
  times its rate (the price of never asking PostgreSQL per request).
* :class:`UsageRecorder`: requests and scored rows per key, model and hour, counted in memory
  and added to PostgreSQL in the background about once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

from services.gateway.keys import ApiKey, KeyStore, RateLimit, UsageRow
from services.mesh.postgres import translated_errors

log = logging.getLogger(__name__)

DEFAULT_RATE: Final = RateLimit(requests_per_second=50.0, burst=100)
"""The limit of keys created without one."""
MAX_BUCKETS: Final = 100_000
USAGE_FLUSH_INTERVAL_S: Final = 1.0
_BUCKET_SECONDS: Final = 3600


def retry_after_seconds(wait_s: float) -> int:
    """The ``Retry-After`` value for a refusal that must wait ``wait_s``: whole seconds,
    rounded up (rounding down would invite a retry that is refused again), at least 1."""
    return max(1, math.ceil(wait_s))


class TokenBucket:
    """``burst`` tokens, refilled at ``requests_per_second``; a request takes one.

    Starts full. ``clock`` (monotonic seconds) is injectable so tests can move time.
    """

    __slots__ = ("_clock", "_last", "_tokens", "burst", "requests_per_second")

    def __init__(
        self, requests_per_second: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not (math.isfinite(requests_per_second) and requests_per_second > 0) or burst < 1:
            raise ValueError(
                f"need a rate above 0 and a burst of at least 1, not {requests_per_second} and {burst}"
            )
        self.requests_per_second = requests_per_second
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def _refill(self) -> float:
        now = self._clock()
        # max(): a clock that steps back (a fake one) must not drain the bucket
        elapsed = max(0.0, now - self._last)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.requests_per_second)
        self._last = now
        return self._tokens

    def take(self, n: int = 1) -> float:
        """Takes ``n`` tokens and returns 0.0, or takes none and returns the seconds until
        ``n`` will be there. A refused request costs nothing, so a client that waits the
        returned time gets through. ``ValueError`` when ``n`` exceeds the burst: it would
        never get through."""
        if n > self.burst:
            raise ValueError(f"{n} tokens can never be taken from a bucket of {self.burst}")
        tokens = self._refill()
        if tokens >= n:
            self._tokens = tokens - n
            return 0.0
        return (n - tokens) / self.requests_per_second

    def is_full(self) -> bool:
        """Whether the bucket is full: then it holds no memory of past requests and can be
        dropped and later recreated without changing what it allows."""
        return self._refill() >= self.burst


class RateLimiter:
    """One :class:`TokenBucket` per API key id, at the key's rate or else ``default``.

    At most ``max_buckets`` are held, least recently used dropped first (a dropped bucket
    that was not yet full comes back full: a rare, bounded leniency). :meth:`prune` drops
    the full ones; call it now and then to keep memory to the keys in use.
    """

    def __init__(
        self,
        default: RateLimit = DEFAULT_RATE,
        *,
        max_buckets: int = MAX_BUCKETS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_buckets < 1:
            raise ValueError("max_buckets must be at least 1")
        self._default = default
        self._max = max_buckets
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[RateLimit, TokenBucket]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: ApiKey, n: int = 1) -> float:
        """0.0 when ``key`` may make ``n`` more requests now, else the seconds to wait."""
        rate = key.rate or self._default
        entry = self._buckets.get(key.id)
        if entry is None or entry[0] != rate:
            # new, or the key's limit changed: a fresh bucket at the new rate
            entry = (rate, TokenBucket(rate.requests_per_second, rate.burst, clock=self._clock))
            self._buckets[key.id] = entry
            while len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(key.id)
        return entry[1].take(n)

    def prune(self) -> int:
        """Drops the buckets that are full and returns how many."""
        idle = [key_id for key_id, (_, bucket) in self._buckets.items() if bucket.is_full()]
        for key_id in idle:
            del self._buckets[key_id]
        return len(idle)


class UsageRecorder:
    """Counts requests and scored rows per (key, model, hour) and adds them to PostgreSQL.

    :meth:`record` is synchronous and O(1): the request path never waits for the database.
    A background task (:meth:`start`) flushes every ``flush_interval_s``; :meth:`close`
    flushes what is left. Counts whose write fails are kept and retried with the next flush.
    ``clock`` (wall-clock seconds since the epoch) picks the hour a request counts in.
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        flush_interval_s: float = USAGE_FLUSH_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if flush_interval_s <= 0:
            raise ValueError("flush_interval_s must be above 0")
        self._store = store
        self._interval = flush_interval_s
        self._clock = clock
        # (key id, tenant, model, hour number) -> [requests, rows]
        self._pending: dict[tuple[str, str, str, int], list[int]] = {}
        # the task and explicit flushes take turns, so a flush waits for a write in flight
        self._flush_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def pending(self) -> int:
        """How many (key, model, hour) counters wait to be written."""
        return len(self._pending)

    def start(self) -> None:
        """Starts the flushing task (in the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="usage-recorder")

    def record(self, key: ApiKey, model: str = "", rows: int = 0) -> None:
        """Counts one request by ``key`` for ``model`` ('' when it names none) that scored
        ``rows`` rows."""
        counter_key = (key.id, key.tenant, model, int(self._clock()) // _BUCKET_SECONDS)
        counts = self._pending.get(counter_key)
        if counts is None:
            self._pending[counter_key] = [1, rows]
        else:
            counts[0] += 1
            counts[1] += rows

    async def flush(self) -> None:
        """Writes every count recorded before the call. UNAVAILABLE when the database is
        unreachable (the counts are kept for the next flush)."""
        async with self._flush_lock, translated_errors():
            await self._write()

    async def usage(
        self,
        *,
        key_id: str | None = None,
        tenant: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        hourly: bool = True,
    ) -> list[UsageRow]:
        """:meth:`KeyStore.read_usage`, counts recorded up to this call included (it flushes
        first)."""
        await self.flush()
        return await self._store.read_usage(
            key_id=key_id, tenant=tenant, model=model, since=since, until=until, hourly=hourly
        )

    async def close(self) -> None:
        """Stops the task and writes what is left; finishes even if the caller is cancelled
        meanwhile. Call after the server stopped taking requests, before the store closes."""
        self._closing = True
        await asyncio.shield(self._close())

    async def _close(self) -> None:
        if self._task is not None:
            self._wake.set()
            await self._task
        try:
            await self.flush()
        except Exception:
            log.exception("usage counts of %d (key, model, hour) were lost at shutdown", len(self._pending))

    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            if self._closing:
                return
            try:
                await self.flush()
            except Exception as error:
                # requests must not see this; the counts wait for the next round
                log.error("writing usage counts failed: %s: %s", type(error).__name__, error)

    async def _write(self) -> None:
        if not self._pending:
            return
        # swapped without an await in between, so no record() lands in the batch being written
        batch, self._pending = self._pending, {}
        increments = [
            UsageRow(key_id, tenant, model, datetime.fromtimestamp(hour * _BUCKET_SECONDS, UTC), r, n)
            for (key_id, tenant, model, hour), (r, n) in batch.items()
        ]
        try:
            await self._store.add_usage(increments)
        except BaseException:
            # the transaction rolled back: put the counts back, adding what arrived meanwhile
            for counter_key, (requests, rows) in batch.items():
                counts = self._pending.setdefault(counter_key, [0, 0])
                counts[0] += requests
                counts[1] += rows
            raise
