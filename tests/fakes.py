"""Fakes that implement an interface for pure-logic tests (never a stand-in for a real server)."""

from __future__ import annotations


class FakeClock:
    """A clock that moves only when a test sets ``now``: for code that takes ``clock=``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
