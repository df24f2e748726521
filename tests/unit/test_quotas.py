"""Token buckets and the per-key rate limiter, on a fake clock."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.gateway.keys import ApiKey, RateLimit, Scope
from services.gateway.quotas import RateLimiter, TokenBucket, retry_after_seconds
from tests.fakes import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _key(key_id: str, rate: RateLimit | None = None) -> ApiKey:
    return ApiKey(
        id=key_id,
        tenant="acme",
        scopes=frozenset({Scope.SCORE}),
        description="",
        created_by="test",
        create_time=datetime(2025, 1, 1, tzinfo=UTC),
        rate=rate,
    )


def test_a_full_bucket_allows_its_burst_then_refuses(clock: FakeClock) -> None:
    bucket = TokenBucket(2.0, 5, clock=clock)
    assert [bucket.take() for _ in range(5)] == [0.0] * 5
    # empty: one token comes back after 1 / rate seconds
    assert bucket.take() == pytest.approx(0.5)
    assert retry_after_seconds(bucket.take()) == 1


def test_refused_requests_cost_nothing_and_waiting_the_answer_gets_through(clock: FakeClock) -> None:
    bucket = TokenBucket(4.0, 1, clock=clock)
    assert bucket.take() == 0.0
    clock.now += 0.1
    wait = bucket.take()
    assert wait == pytest.approx(0.15)
    # a refusal took nothing: asking again at once says the same
    assert bucket.take() == pytest.approx(0.15)
    clock.now += wait
    assert bucket.take() == 0.0


def test_refill_is_proportional_to_time_and_capped_at_the_burst(clock: FakeClock) -> None:
    bucket = TokenBucket(10.0, 3, clock=clock)
    for _ in range(3):
        bucket.take()
    clock.now += 0.2  # two tokens
    assert bucket.take(2) == 0.0
    assert bucket.take() == pytest.approx(0.1)
    clock.now += 3600
    assert bucket.is_full()
    assert [bucket.take() for _ in range(4)][-1] == pytest.approx(0.1)


def test_taking_several_tokens_waits_for_all_of_them(clock: FakeClock) -> None:
    bucket = TokenBucket(1.0, 10, clock=clock)
    assert bucket.take(8) == 0.0
    assert bucket.take(5) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="never"):
        bucket.take(11)


def test_a_clock_stepping_back_does_not_drain_the_bucket(clock: FakeClock) -> None:
    bucket = TokenBucket(1.0, 2, clock=clock)
    clock.now -= 100
    assert bucket.take(2) == 0.0


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (float("inf"), 1), (1.0, 0)])
def test_a_bucket_refuses_a_bad_rate_or_burst(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate, burst)


@pytest.mark.parametrize(("wait", "header"), [(0.001, 1), (1.0, 1), (1.01, 2), (59.5, 60)])
def test_retry_after_rounds_up_to_whole_seconds(wait: float, header: int) -> None:
    assert retry_after_seconds(wait) == header


def test_keys_have_their_own_buckets(clock: FakeClock) -> None:
    limiter = RateLimiter(RateLimit(1.0, 2), clock=clock)
    a, b = _key("aaaaaaaaaaaa"), _key("bbbbbbbbbbbb")
    assert limiter.take(a) == limiter.take(a) == 0.0
    assert limiter.take(a) == pytest.approx(1.0)
    # a's exhaustion leaves b untouched
    assert limiter.take(b) == limiter.take(b) == 0.0
    assert limiter.take(b) == pytest.approx(1.0)


def test_a_key_with_its_own_rate_uses_it_and_a_changed_rate_takes_effect(clock: FakeClock) -> None:
    limiter = RateLimiter(RateLimit(1.0, 1), clock=clock)
    fast = _key("cccccccccccc", RateLimit(100.0, 10))
    assert all(limiter.take(fast) == 0.0 for _ in range(10))
    assert limiter.take(fast) == pytest.approx(0.01)
    slower = _key("cccccccccccc", RateLimit(1.0, 3))
    assert [limiter.take(slower) for _ in range(4)][-1] == pytest.approx(1.0)


def test_the_limiter_holds_at_most_max_buckets_dropping_the_least_recently_used(clock: FakeClock) -> None:
    limiter = RateLimiter(RateLimit(1.0, 1), max_buckets=2, clock=clock)
    a, b, c = _key("aaaaaaaaaaaa"), _key("bbbbbbbbbbbb"), _key("cccccccccccc")
    limiter.take(a)
    limiter.take(b)
    assert limiter.take(a) > 0  # a is now the most recently used
    limiter.take(c)
    assert len(limiter) == 2
    # b was dropped, a kept its (empty) bucket
    assert limiter.take(a) > 0
    assert limiter.take(b) == 0.0


def test_prune_drops_only_full_buckets(clock: FakeClock) -> None:
    limiter = RateLimiter(RateLimit(1.0, 2), clock=clock)
    a, b = _key("aaaaaaaaaaaa"), _key("bbbbbbbbbbbb")
    limiter.take(a)
    clock.now += 5
    limiter.take(b)
    assert limiter.prune() == 1  # a refilled; b has not
    assert len(limiter) == 1
    assert limiter.take(b) == 0.0
    assert limiter.take(b) > 0
