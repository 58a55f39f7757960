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


class _LiveRateThrottle(SimpleRateThrottle):
    def get_rate(self):
        return api_settings.DEFAULT_THROTTLE_RATES[self.scope]


class SignupThrottle(_LiveRateThrottle):
    """Every sign-up attempt counts, successful or not, per client address."""

    scope = "signup"

    def get_cache_key(self, request, view):
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


class _FailureBucket(_LiveRateThrottle):
    """A sliding window of *failed* attempts under one key; successes are never counted."""

    scope = "login"

    def __init__(self, key: str):
        super().__init__()
        self.key = key
        self.now = self.timer()
        self.history = [t for t in self.cache.get(key, []) if t > self.now - self.duration]

    def full(self) -> bool:
        return len(self.history) >= self.num_requests

    def seconds_until_free(self) -> int:
        # The oldest failure leaving the window frees one attempt.
        return max(1, math.ceil(self.duration - (self.now - self.history[-1])))

    def record(self) -> None:
        self.history.insert(0, self.now)
        self.cache.set(self.key, self.history, self.duration)


class LoginFailureThrottle:
    """Counts failed logins per client address and per email, each against ``LOGIN_RATE``.

    * Per address: one machine guessing (or spraying many accounts) is stopped, and only that
      machine — the real owner logging in from elsewhere is unaffected.
    * Per email: guesses spread over many addresses against one account are stopped too. The
      price is that an attacker can hold one account's logins shut for at most one window; that
      is the usual trade against unbounded password guessing.

    Only failures are recorded, so a user who logs in correctly many times is never throttled.
    While either bucket is full the password is not even checked, so a 200 cannot leak it.
    """

    def __init__(self, request, email: str):
        # DRF's get_ident honours NUM_PROXIES for X-Forwarded-For; reuse it rather than parse again.
        ident = BaseThrottle().get_ident(request)
        email_digest = hashlib.sha256(email.strip().lower().encode()).hexdigest()
        self.buckets = [
            _FailureBucket(f"throttle_login_fail_addr_{ident}"),
            _FailureBucket(f"throttle_login_fail_email_{email_digest}"),
        ]

    def wait(self) -> int | None:
        """Seconds to wait when throttled, else ``None``."""
        waits = [bucket.seconds_until_free() for bucket in self.buckets if bucket.full()]
        return max(waits) if waits else None

    def record_failure(self) -> None:
        for bucket in self.buckets:
            bucket.record()
