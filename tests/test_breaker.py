"""core.breaker.CircuitBreaker on a clock the test turns: closed → open → half-open → closed."""

from __future__ import annotations

import threading

from core.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(threshold=3, cooldown=30.0):
    clock = Clock()
    return CircuitBreaker(threshold=threshold, cooldown=cooldown, clock=clock), clock


def fail(b: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        b.failure(b.allow())


def test_it_opens_after_threshold_failures_in_a_row_and_refuses_meanwhile():
    b, _ = breaker()
    fail(b, 2)
    assert b.snapshot().state == CLOSED and b.allow() is not None

    fail(b, 1)

    assert b.snapshot().state == OPEN and b.snapshot().failures == 3
    assert b.allow() is None
    assert b.snapshot().retry_in == 30.0


def test_a_success_between_failures_resets_the_count():
    b, _ = breaker()
    fail(b, 2)
    b.success(b.allow())
    fail(b, 2)
    assert b.snapshot().state == CLOSED


def test_after_the_cooldown_exactly_one_probe_goes_and_its_success_closes_it():
    b, clock = breaker()
    fail(b, 3)
    clock.now += 29.9
    assert b.allow() is None and round(b.snapshot().retry_in, 1) == 0.1

    clock.now += 0.1
    assert b.snapshot().state == HALF_OPEN
    probe = b.allow()
    assert probe is not None and probe.probe
    assert b.allow() is None  # one probe at a time

    b.success(probe)

    assert b.snapshot().state == CLOSED and b.snapshot().failures == 0
    assert b.allow() is not None


def test_a_failed_probe_opens_it_for_another_cooldown():
    b, clock = breaker()
    fail(b, 3)
    clock.now += 30
    probe = b.allow()

    b.failure(probe)

    assert b.snapshot().state == OPEN and b.allow() is None
    clock.now += 30
    assert b.allow() is not None


def test_an_abandoned_probe_frees_its_place_for_the_next_request():
    b, clock = breaker()
    fail(b, 3)
    clock.now += 30
    probe = b.allow()

    b.abandon(probe)  # the client left mid-probe: no verdict

    assert b.snapshot().state == HALF_OPEN
    assert b.allow().probe


def test_a_late_failure_of_a_request_let_through_before_it_opened_does_not_extend_the_cooldown():
    b, clock = breaker()
    early = b.allow()
    fail(b, 3)
    clock.now += 20
    b.failure(early)
    clock.now += 10
    assert b.allow() is not None  # still 30 s after it opened


def test_a_zero_threshold_never_opens():
    b, _ = breaker(threshold=0)
    fail(b, 100)
    assert b.snapshot().state == CLOSED


def test_only_one_of_many_racing_threads_gets_the_probe():
    b, clock = breaker()
    fail(b, 3)
    clock.now += 30
    barrier = threading.Barrier(16)
    permits = []

    def race():
        barrier.wait()
        permits.append(b.allow())

    threads = [threading.Thread(target=race) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert sum(permit is not None for permit in permits) == 1
