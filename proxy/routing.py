"""Choosing among a model's upstreams: a circuit breaker and a concurrency limit per upstream.

Both are **per server process**, in memory: checking them costs a request no round trip (a
breaker shared through Redis would put one on every request), and what they protect against —
an upstream that refuses connections, times out or answers 5xx — every process finds out for
itself within ``UPSTREAM_BREAKER_FAILURES`` requests. So with N processes a dead upstream costs
at most N × that many failed attempts per cool-down, each of which fails over to the next
candidate rather than failing the request. ``/readyz`` and the staff dashboard show the states
of the process that answers them.

* Breaker (``core.breaker``): ``UPSTREAM_BREAKER_FAILURES`` failures before any output in a row
  open it for ``UPSTREAM_BREAKER_COOLDOWN`` seconds, during which the upstream is skipped; then
  one probe request may go, and its success closes it. A failure is a connection failure, a
  timeout or a 5xx before any output (what fails a request over); any other answer, a 4xx
  included, shows the upstream alive.
* Concurrency limit: an upstream's ``max_concurrency`` requests in flight per process at most
  (0 = no limit). A request over it does not wait: it goes to the next candidate, or — with none
  left — is answered 503 ``upstream_busy`` (``Retry-After: 1``), nothing charged. Being busy
  says nothing about the upstream's health, so it never counts against its breaker.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from django.conf import settings

from core.breaker import BreakerState, CircuitBreaker, Permit

from . import upstream
from .selectors import Route

_lock = threading.Lock()
_breakers: dict[str, CircuitBreaker] = {}
_limiters: dict[str, Limiter] = {}


class UpstreamBusy(httpx.TransportError):
    """The upstream already has its ``max_concurrency`` requests in flight from this process."""


class UpstreamUnusable(httpx.TransportError):
    """The upstream cannot be called as configured (its stored key cannot be decrypted)."""


class Limiter:
    """A count of requests in flight that refuses, rather than waits, beyond ``limit``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0

    def acquire(self, limit: int) -> bool:
        with self._lock:
            if limit and self.in_flight >= limit:
                return False
            self.in_flight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1


def breaker(name: str) -> CircuitBreaker:
    with _lock:
        found = _breakers.get(name)
        if found is None:
            found = _breakers[name] = CircuitBreaker(threshold=0, cooldown=0)
    # The settings of the moment (two attribute writes): a changed setting applies at once.
    found.threshold, found.cooldown = settings.UPSTREAM_BREAKER_FAILURES, settings.UPSTREAM_BREAKER_COOLDOWN
    return found


def limiter(name: str) -> Limiter:
    with _lock:
        found = _limiters.get(name)
        if found is None:
            found = _limiters[name] = Limiter()
    return found


_DEMO = Permit(probe=False)  # the demo model is served in-process: nothing to break or limit


def admit(route: Route) -> Permit | None:
    """May this route be tried now? None while its upstream's breaker is open."""
    return _DEMO if route.is_demo else breaker(route.name).allow()


def report(route: Route, permit: Permit, *, failed: bool | None) -> None:
    """The attempt's result: failed before any output (True), answered (False), or unknown —
    it was cancelled, or was refused by the concurrency limit (None)."""
    if route.is_demo:
        return
    if failed is None:
        breaker(route.name).abandon(permit)
    elif failed:
        breaker(route.name).failure(permit)
    else:
        breaker(route.name).success(permit)


def retry_in(routes: list[Route]) -> float:
    """Seconds until the first of these upstreams' breakers lets a probe through."""
    return min((breaker(route.name).snapshot().retry_in for route in routes), default=0.0)


@asynccontextmanager
async def opened(target: upstream.UpstreamConfig, path: str, content: bytes) -> AsyncIterator[httpx.Response]:
    """``upstream.stream`` within the upstream's concurrency limit: a place is taken on entry
    (``UpstreamBusy`` when there is none) and given back when the response is closed."""
    if target.unusable:
        raise UpstreamUnusable(f"upstream {target.name} cannot be used: {target.unusable}")
    places = limiter(target.name)
    if not places.acquire(target.max_concurrency):
        raise UpstreamBusy(f"upstream {target.name} has {target.max_concurrency} requests in flight")
    try:
        async with upstream.stream(path, content, target) as response:
            yield response
    finally:
        places.release()


def states(configs: list[upstream.UpstreamConfig]) -> dict[str, dict]:
    """Each upstream's breaker and load in this process, for ``/readyz`` and the dashboard."""
    result = {}
    for config in configs:
        state: BreakerState = breaker(config.name).snapshot()
        entry = {"kind": config.kind, "breaker": state.state, "failures": state.failures}
        if state.retry_in:
            entry["retry_in"] = round(state.retry_in, 1)
        entry["in_flight"] = limiter(config.name).in_flight
        if config.max_concurrency:
            entry["max_concurrency"] = config.max_concurrency
        if config.unusable:
            entry["error"] = config.unusable
        result[config.name] = entry
    return result


def reset() -> None:
    """Forget every breaker and count (tests; a process starts with all breakers closed)."""
    with _lock:
        _breakers.clear()
        _limiters.clear()
