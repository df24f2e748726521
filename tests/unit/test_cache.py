"""The response cache: LRU byte bound, per-version eviction, in-flight sharing."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from services.mesh.errors import InvalidArgument
from services.scoring.cache import (
    ENTRY_OVERHEAD_BYTES,
    CacheKey,
    Outputs,
    ResponseCache,
)

pytestmark = pytest.mark.timeout(10)

ENTRY_BYTES = 1000 + ENTRY_OVERHEAD_BYTES


def key(n: int, model: str = "m", version: int = 1) -> CacheKey:
    return CacheKey(model, version, n.to_bytes(16, "little"))


def outputs(value: float) -> Outputs:
    return {"y": np.full(125, value)}  # 1000 bytes of float64


class Computation:
    """A compute function held open until ``release``; counts its calls."""

    def __init__(self, result: Outputs | None = None, error: Exception | None = None) -> None:
        self.result = result if result is not None else outputs(7.0)
        self.error = error
        self.release = asyncio.Event()
        self.calls = 0
        self.finished = False

    async def __call__(self) -> Outputs:
        self.calls += 1
        await self.release.wait()
        self.finished = True
        if self.error is not None:
            raise self.error
        return self.result


# the LRU


def test_entries_beyond_the_byte_bound_evict_the_least_recently_used() -> None:
    cache = ResponseCache(3 * ENTRY_BYTES)
    for n in range(3):
        cache.put(key(n), outputs(n))
    assert cache.get(key(0)) is not None  # 0 is now the most recent

    cache.put(key(3), outputs(3))

    assert cache.get(key(1)) is None
    for n in (0, 2, 3):
        stored = cache.get(key(n))
        assert stored is not None
        np.testing.assert_array_equal(stored["y"], outputs(n)["y"])
    assert cache.stats.evictions == 1
    assert cache.stats.entries == 3
    assert cache.stats.bytes == 3 * ENTRY_BYTES


def test_an_entry_larger_than_the_cache_is_not_stored() -> None:
    cache = ResponseCache(ENTRY_BYTES - 1)
    cache.put(key(0), outputs(0))
    assert cache.get(key(0)) is None
    assert cache.stats.bytes == 0


def test_replacing_an_entry_keeps_the_accounting_right() -> None:
    cache = ResponseCache(10 * ENTRY_BYTES)
    cache.put(key(0), outputs(0))
    cache.put(key(0), outputs(1))
    assert cache.stats.entries == 1
    assert cache.stats.bytes == ENTRY_BYTES


def test_stored_outputs_are_read_only_copies() -> None:
    cache = ResponseCache(10 * ENTRY_BYTES)
    batch = np.arange(10.0)
    cache.put(key(0), {"y": batch[2:4]})
    batch[2] = -1.0

    stored = cache.get(key(0))
    assert stored is not None
    np.testing.assert_array_equal(stored["y"], [2.0, 3.0])
    assert stored["y"].base is None  # does not pin the batch it was a view of
    with pytest.raises(ValueError, match="read-only"):
        stored["y"][0] = 0.0


def test_evicting_a_version_drops_only_its_entries() -> None:
    cache = ResponseCache(10 * ENTRY_BYTES)
    cache.put(key(0, version=1), outputs(0))
    cache.put(key(1, version=1), outputs(1))
    cache.put(key(0, version=2), outputs(2))
    cache.put(key(0, model="other", version=1), outputs(3))

    assert cache.evict_version("m", 1) == 2

    assert cache.get(key(0, version=1)) is None
    assert cache.get(key(1, version=1)) is None
    assert cache.get(key(0, version=2)) is not None
    assert cache.get(key(0, model="other", version=1)) is not None
    assert cache.stats.bytes == 2 * ENTRY_BYTES
    assert cache.stats.invalidations == 2
    assert cache.evict_version("m", 1) == 0


# in-flight sharing


async def test_identical_concurrent_requests_share_one_computation() -> None:
    cache = ResponseCache(10 * ENTRY_BYTES)
    compute = Computation()
    callers = [asyncio.create_task(cache.get_or_compute(key(0), compute)) for _ in range(10)]
    await asyncio.sleep(0)

    compute.release.set()
    results = await asyncio.gather(*callers)

    assert compute.calls == 1
    for result in results:
        np.testing.assert_array_equal(result["y"], outputs(7.0)["y"])
    assert (cache.stats.misses, cache.stats.shared) == (1, 9)

    again = await cache.get_or_compute(key(0), Computation())
    np.testing.assert_array_equal(again["y"], outputs(7.0)["y"])
    assert cache.stats.hits == 1


async def test_a_failure_reaches_every_caller_and_is_not_stored() -> None:
    cache = ResponseCache(10 * ENTRY_BYTES)
    error = InvalidArgument("bad input")
    compute = Computation(error=error)
    callers = [asyncio.create_task(cache.get_or_compute(key(0), compute)) for _ in range(10)]
    await asyncio.sleep(0)

    compute.release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)

    assert compute.calls == 1
    assert all(r is error for r in results)
    retry = Computation()
    retry.release.set()
    await cache.get_or_compute(key(0), retry)
    assert retry.calls == 1


async def test_the_first_caller_going_away_does_not_cancel_the_others() -> None:
    cache = ResponseCache(10 * ENTRY_BYTES)
    compute = Computation()
    first = asyncio.create_task(cache.get_or_compute(key(0), compute))
    await asyncio.sleep(0)
    others = [asyncio.create_task(cache.get_or_compute(key(0), compute)) for _ in range(3)]
    await asyncio.sleep(0)

    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    compute.release.set()

    for result in await asyncio.gather(*others):
        np.testing.assert_array_equal(result["y"], outputs(7.0)["y"])
    assert compute.calls == 1
    assert cache.get(key(0)) is not None


async def test_a_computation_nobody_waits_for_still_fills_the_cache() -> None:
    cache = ResponseCache(10 * ENTRY_BYTES)
    compute = Computation()
    caller = asyncio.create_task(cache.get_or_compute(key(0), compute))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller

    compute.release.set()
    follower = await cache.get_or_compute(key(0), Computation())  # joins or hits, never recomputes
    np.testing.assert_array_equal(follower["y"], outputs(7.0)["y"])
    assert compute.finished


async def test_a_version_evicted_during_a_computation_is_not_stored() -> None:
    cache = ResponseCache(10 * ENTRY_BYTES)
    compute = Computation()
    caller = asyncio.create_task(cache.get_or_compute(key(0), compute))
    await asyncio.sleep(0)

    cache.evict_version("m", 1)
    compute.release.set()
    await caller

    assert cache.get(key(0)) is None


async def test_a_disabled_cache_always_computes() -> None:
    cache = ResponseCache(0)
    compute = Computation()
    compute.release.set()
    await cache.get_or_compute(key(0), compute)
    await cache.get_or_compute(key(0), compute)
    assert compute.calls == 2
    assert cache.stats.entries == 0


async def test_close_cancels_computations_in_flight_and_empties_the_cache() -> None:
    cache = ResponseCache(10 * ENTRY_BYTES)
    cache.put(key(1), outputs(1))
    compute = Computation()
    caller = asyncio.create_task(cache.get_or_compute(key(0), compute))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller

    await cache.close()

    assert not compute.finished
    assert cache.get(key(1)) is None
    assert cache.stats.bytes == 0
