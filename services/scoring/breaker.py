"""A circuit breaker around a backend: stop calling it while it is down, probe it now and then.

    CLOSED ──N consecutive failures──▶ OPEN ──open_s elapsed──▶ HALF_OPEN
      ▲                                  ▲                          │
      └────────── probe succeeds ────────┼───── probe fails ────────┘

Consecutive failures, not a failure ratio: a backend that is down fails every call, and
counting in a row needs no window to tune. Callers report only failures that say the backend
cannot serve (``Unavailable``), not a request's bad input.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

__all__ = ["BreakerState", "CircuitBreaker", "TransitionListener"]

log = logging.getLogger(__name__)


class BreakerState(enum.Enum):
    CLOSED = "closed"
    """Calls go through; failures are counted."""
    OPEN = "open"
    """Calls fail fast until ``open_s`` has passed."""
    HALF_OPEN = "half_open"
    """One probe call goes through; its outcome closes or reopens the breaker."""


TransitionListener = Callable[[BreakerState, BreakerState], None]
"""Called with (old, new) on every state change, e.g. to count it in metrics."""


class CircuitBreaker:
    """``failures``: consecutive failures that open the breaker. ``open_s``: how long it stays
    open before letting one probe through; a probe that reports nothing within ``open_s``
    (its caller went away) is given up and another one allowed. ``clock``: seconds,
    monotonic. ``on_transition``: see :data:`TransitionListener`."""

    def __init__(
        self,
        failures: int = 3,
        open_s: float = 2.0,
        *,
        name: str = "backend",
        clock: Callable[[], float] = time.monotonic,
        on_transition: TransitionListener | None = None,
    ) -> None:
        if failures < 1:
            raise ValueError(f"failures must be >= 1, not {failures}")
        if open_s <= 0:
            raise ValueError(f"open_s must be > 0, not {open_s}")
        self.name = name
        self._threshold = failures
        self._open_s = open_s
        self._clock = clock
        self._listener = on_transition
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_at: float | None = None
        self.transitions: dict[BreakerState, int] = dict.fromkeys(BreakerState, 0)
        """How many times each state was entered."""

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker whose time is up reads as half-open."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self._open_s:
            self._move(BreakerState.HALF_OPEN)
        return self._state

    def allow(self) -> bool:
        """Whether a call may go to the backend now. In half-open, True once: that caller is
        the probe and must report its outcome."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        now = self._clock()
        if self._probe_at is not None and now - self._probe_at < self._open_s:
            return False
        self._probe_at = now
        return True

    def record_success(self) -> None:
        """A call went through. Closes a half-open breaker; a late success while open (from a
        call that started before it opened) proves nothing and is ignored."""
        state = self.state
        if state is BreakerState.CLOSED:
            self._failures = 0
        elif state is BreakerState.HALF_OPEN:
            self._move(BreakerState.CLOSED)

    def record_failure(self) -> None:
        """The backend could not serve a call. Opens the breaker after ``failures`` in a row,
        or at once when half-open; late failures while open do not extend it."""
        state = self.state
        if state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self._threshold:
                self._move(BreakerState.OPEN)
        elif state is BreakerState.HALF_OPEN:
            self._move(BreakerState.OPEN)

    def _move(self, new: BreakerState) -> None:
        old = self._state
        self._state = new
        self._failures = 0
        self._probe_at = None
        if new is BreakerState.OPEN:
            self._opened_at = self._clock()
        self.transitions[new] += 1
        level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
        log.log(level, "circuit breaker %s: %s -> %s", self.name, old.value, new.value)
        if self._listener is not None:
            self._listener(old, new)
