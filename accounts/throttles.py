"""Throttles for the unauthenticated account endpoints.

Rates come from ``REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]`` (``signup`` ← ``SIGNUP_RATE``,
``login`` ← ``LOGIN_RATE``). DRF's ``SimpleRateThrottle`` copies that dict into a class attribute
at import time, so a later settings change (tests, ``override_settings``) would be ignored; the
rate is read at request time instead.

Counters live in the default cache (Redis when ``REDIS_URL`` is set, so every process shares
them). Like DRF's own throttles the read-modify-write is not atomic: two requests racing may
both be counted as one. That lets a burst slip by a request or two, never locks anyone out.
"""

from __future__ import annotations

import hashlib
import math

from rest_framework.settings import api_settings
from rest_framework.throttling import BaseThrottle, SimpleRateThrottle


class LiveRateThrottle(SimpleRateThrottle):
    """DRF's rate throttle, reading its scope's rate when it runs (see the module docstring)."""

    def get_rate(self):
        return api_settings.DEFAULT_THROTTLE_RATES[self.scope]


class SignupThrottle(LiveRateThrottle):
    """Every sign-up attempt counts, successful or not, per client address."""

    scope = "signup"

    def get_cache_key(self, request, view):
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


class _FailureBucket(LiveRateThrottle):
    """A sliding window of *failed* attempts under one key; successes are never counted."""

    scope = "login"

    def __init__(self, key: str):
        super().__init__()
        self.key = key
        self.now = self.timer()
        self.history = [t for t in self.cache.get(key, []) if t > self.now - self.duration]

    def full(self) -> bool:
        return len(self.history) >= self.num_requests

    def empty(self) -> bool:
        return not self.history

    def seconds_until_free(self) -> int:
        # The oldest failure that still counts leaving the window frees one attempt.
        return self._seconds_left(self.history[min(len(self.history), self.num_requests) - 1])

    def seconds_until_empty(self) -> int:
        return self._seconds_left(self.history[0])

    def _seconds_left(self, failed_at: float) -> int:
        return max(1, math.ceil(self.duration - (self.now - failed_at)))

    def record(self) -> None:
        # Only the newest ``num_requests`` matter (full or not, and when a slot frees), so the
        # list stays that short however many addresses pile failures onto one account.
        self.history = [self.now, *self.history][: self.num_requests]
        self.cache.set(self.key, self.history, self.duration)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class LoginFailureThrottle:
    """Failed sign-ins, counted alike by ``/login``, ``/admin/login/`` and ``/api/auth/token``
    (one set of buckets, so failures on any of them count together), each against ``LOGIN_RATE``.

    * Per client address: one machine guessing (or spraying many accounts) is stopped once it has
      failed ``LOGIN_RATE`` times — and only that machine.
    * Per account: guesses spread over many addresses. This bucket never blocks on its own (else
      anyone could lock the owner out by failing from rotating addresses); while it is full the
      account is under attack, and an address that has *itself* failed for this account in the
      window (the per account-and-address bucket) gets no further attempt at it until those
      failures age out. A fresh address — the owner's — still signs in normally. A distributed
      guesser is thereby slowed from ``LOGIN_RATE`` guesses per address per window to one.

    Only failures are recorded, so a user who signs in correctly many times is never throttled.
    While throttled the password is not even checked, so the answer cannot leak it.
    """

    def __init__(self, request, email: str):
        # DRF's get_ident honours NUM_PROXIES (0: REMOTE_ADDR, which uvicorn sets) — reuse it
        # rather than read the address again.
        # No address at all (an ASGI server on a Unix socket sets no client) is one bucket, "None",
        # as in DRF's own throttles.
        ident = str(BaseThrottle().get_ident(request))
        account = email.strip().lower()
        self.address = _FailureBucket(f"throttle_login_fail_addr_{ident}")
        self.account = _FailureBucket(f"throttle_login_fail_email_{_digest(account)}")
        self.account_address = _FailureBucket(f"throttle_login_fail_email_addr_{_digest(account, ident)}")

    def wait(self) -> int | None:
        """Seconds to wait when throttled, else ``None``."""
        waits = []
        if self.address.full():
            waits.append(self.address.seconds_until_free())
        if self.account.full() and not self.account_address.empty():
            # Free again when either ends: the attack on the account, or this address's failures.
            waits.append(min(self.account.seconds_until_free(), self.account_address.seconds_until_empty()))
        return max(waits) if waits else None

    def record_failure(self) -> None:
        for bucket in (self.address, self.account, self.account_address):
            bucket.record()
