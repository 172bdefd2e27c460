"""Clocks for the control loop: the host monotonic clock, and a fake one that tests advance by hand."""

from __future__ import annotations

import time


class MonotonicClock:
    """time.monotonic with a sleep that wakes at an absolute deadline (no drift accumulates)."""

    def now(self) -> float:
        return time.monotonic()

    def sleep_until(self, deadline: float) -> None:
        # Sleep short of the deadline, then yield in small slices: time.sleep alone overshoots by the
        # scheduler's granularity, which at 50 Hz is a visible fraction of the period.
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(remaining - 0.0005 if remaining > 0.002 else remaining / 2)

    __call__ = now


class FakeClock:
    """A clock that only moves when told to; sleep_until jumps straight to the deadline."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = float(start)

    def now(self) -> float:
        return self.t

    def advance(self, dt: float) -> float:
        self.t += dt
        return self.t

    def sleep_until(self, deadline: float) -> None:
        self.t = max(self.t, deadline)

    __call__ = now
