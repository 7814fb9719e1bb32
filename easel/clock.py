"""Time, injected: the one place the lifecycle, leases, rate limits and auth read the time from.

Production code takes a :class:`Clock` (default :data:`SYSTEM`) instead of calling
``time.time()``; a test passes a :class:`ManualClock` and moves it with :meth:`ManualClock.advance`
instead of sleeping until a lease expires, a signature ages out or a rate-limit window passes.

Both readings are floats in seconds: :meth:`Clock.now` is wall-clock Unix time (UTC, what is
stored in the database and compared across processes and machines), :meth:`Clock.monotonic` is
for intervals inside one process (deadlines, backoff), never stored.
"""
from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    """A source of time. Implementations must be safe to call from any thread."""

    def now(self) -> float:
        """Unix time in seconds (float, UTC), as ``time.time()``."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back, as ``time.monotonic()``; only differences mean anything."""


class SystemClock:
    """The real clock: ``time.time()`` and ``time.monotonic()``."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def __repr__(self) -> str:
        return "SystemClock()"


class ManualClock:
    """A clock that moves only when told to (tests).

    Args:
        start: the initial Unix time in seconds (default: the real time at construction, so rows
            written with it sort sensibly beside real ones).
    """

    def __init__(self, start: float | None = None) -> None:
        self._lock = threading.Lock()
        self._now = time.time() if start is None else float(start)
        self._mono = 0.0

    def now(self) -> float:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def advance(self, seconds: float) -> None:
        """Move both readings forward by ``seconds`` (>= 0).

        Raises:
            ValueError: ``seconds`` is negative (a clock never goes back).
        """
        if seconds < 0:
            raise ValueError(f"ManualClock.advance: seconds must be >= 0, got {seconds}")
        with self._lock:
            self._now += seconds
            self._mono += seconds

    def __repr__(self) -> str:
        return f"ManualClock(now={self._now:.3f})"


SYSTEM: Clock = SystemClock()
"""The process-wide real clock, the default everywhere a clock is accepted."""
