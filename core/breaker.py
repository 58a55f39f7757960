"""A circuit breaker: stop sending requests to a dependency that keeps failing, and find out
cheaply when it is back.

* **closed** — requests pass; ``threshold`` failures in a row (no success between) open it.
* **open** — requests are refused (the caller skips this dependency) for ``cooldown`` seconds.
* **half-open** — after the cool-down exactly one request, the *probe*, is let through; its
  success closes the breaker, its failure opens it for another cool-down. While the probe is out
  every other request is refused, so a dead dependency costs one request per cool-down, not one
  per request.

``allow()`` hands out a ``Permit``; the caller reports every request it let through with it:
``success()``, ``failure()`` or, when it never learnt the answer (the client left mid-request),
``abandon()`` — which frees the probe's place without deciding anything, so a half-open breaker
never waits forever on a probe that was cancelled. Thread-safe; the clock is injectable for tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True)
class Permit:
    """A request let through; handed back with its result."""

    probe: bool  # the half-open probe, whose result decides the breaker


@dataclass(frozen=True)
class BreakerState:
    state: str  # closed | open | half_open
    failures: int  # consecutive failures so far
    retry_in: float  # seconds until an open breaker lets a probe through (0 otherwise)


class CircuitBreaker:
    def __init__(self, *, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic):
        self.threshold = threshold  # 0: never opens
        self.cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None  # set while open or half-open
        self._probing = False  # a half-open probe is out

    def _state(self, now: float) -> str:
        if self._opened_at is None:
            return CLOSED
        return OPEN if now - self._opened_at < self.cooldown else HALF_OPEN

    def allow(self) -> Permit | None:
        """May a request go now? A permit for a closed breaker and for the one half-open probe;
        None while open (or while the probe is out)."""
        with self._lock:
            state = self._state(self._clock())
            if state == CLOSED:
                return Permit(probe=False)
            if state == HALF_OPEN and not self._probing:
                self._probing = True
                return Permit(probe=True)
            return None

    def success(self, permit: Permit | None = None) -> None:
        with self._lock:
            self._failures, self._opened_at, self._probing = 0, None, False

    def failure(self, permit: Permit | None = None) -> None:
        with self._lock:
            now = self._clock()
            self._failures += 1
            if permit is not None and permit.probe:
                self._opened_at, self._probing = now, False  # the probe failed: another cool-down
            elif self._opened_at is None and self.threshold and self._failures >= self.threshold:
                self._opened_at = now
            # (A request let through before the breaker opened and failing late changes nothing
            # more: the breaker is already open, its cool-down running.)

    def abandon(self, permit: Permit | None = None) -> None:
        """A request let through ended without an answer either way (the client left)."""
        if permit is not None and permit.probe:
            with self._lock:
                self._probing = False

    def snapshot(self) -> BreakerState:
        with self._lock:
            now = self._clock()
            state = self._state(now)
            # Only an open breaker has a wait left: closed lets requests pass, and half-open with
            # nobody asking since the cool-down ended lets the next request through as the probe.
            retry_in = 0.0
            if state == OPEN and self._opened_at is not None:  # open implies _opened_at is set
                retry_in = self.cooldown - (now - self._opened_at)
            return BreakerState(state, self._failures, max(retry_in, 0.0))
