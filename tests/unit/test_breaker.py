"""The circuit breaker's state machine, on a fake clock."""

from __future__ import annotations

import pytest

from services.scoring.breaker import BreakerState, CircuitBreaker
from tests.fakes import FakeClock

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def moves() -> list[tuple[BreakerState, BreakerState]]:
    return []


@pytest.fixture
def breaker(clock: FakeClock, moves: list[tuple[BreakerState, BreakerState]]) -> CircuitBreaker:
    return CircuitBreaker(3, 2.0, clock=clock, on_transition=lambda old, new: moves.append((old, new)))


def test_it_opens_after_consecutive_failures_only(breaker: CircuitBreaker) -> None:
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # the streak is broken
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is CLOSED
    assert breaker.allow()

    breaker.record_failure()
    assert breaker.state is OPEN
    assert not breaker.allow()


def test_after_open_s_one_probe_goes_through(breaker: CircuitBreaker, clock: FakeClock) -> None:
    for _ in range(3):
        breaker.record_failure()
    clock.now += 1.9
    assert not breaker.allow()

    clock.now += 0.1
    assert breaker.state is HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow()  # one probe at a time


def test_a_successful_probe_closes_it(
    breaker: CircuitBreaker, clock: FakeClock, moves: list[tuple[BreakerState, BreakerState]]
) -> None:
    for _ in range(3):
        breaker.record_failure()
    clock.now += 2.0
    assert breaker.allow()

    breaker.record_success()

    assert breaker.state is CLOSED
    assert breaker.allow()
    assert moves == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    assert breaker.transitions == {CLOSED: 1, OPEN: 1, HALF_OPEN: 1}
    # it counts failures afresh
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is CLOSED


def test_a_failed_probe_opens_it_again_for_open_s(breaker: CircuitBreaker, clock: FakeClock) -> None:
    for _ in range(3):
        breaker.record_failure()
    clock.now += 2.0
    assert breaker.allow()

    breaker.record_failure()

    assert breaker.state is OPEN
    clock.now += 1.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()


def test_a_probe_that_never_reports_is_given_up_after_open_s(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    for _ in range(3):
        breaker.record_failure()
    clock.now += 2.0
    assert breaker.allow()
    clock.now += 1.0
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()


def test_late_outcomes_while_open_change_nothing(breaker: CircuitBreaker, clock: FakeClock) -> None:
    for _ in range(3):
        breaker.record_failure()
    clock.now += 1.0
    breaker.record_success()  # a call that started before it opened
    assert breaker.state is OPEN
    breaker.record_failure()  # does not push the probe further out
    clock.now += 1.0
    assert breaker.state is HALF_OPEN


@pytest.mark.parametrize(("failures", "open_s"), [(0, 1.0), (1, 0.0)])
def test_bad_settings_are_refused(failures: int, open_s: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        CircuitBreaker(failures, open_s)
