"""Throttles for browser sign-in (accounts/device.py).

* ``DeviceCodeThrottle``: new device codes per client address (``DEVICE_CODE_RATE``) — each one
  is a row, and a flood of them would also crowd the user-code space.
* ``DevicePollThrottle``: token polls per client address (``DEVICE_POLL_RATE``), whatever the
  device code — the per-code ``slow_down`` only reaches a client that polls one code.
* ``UserCodeGuessThrottle``: *wrong* user codes typed on the portal's /device page, per user and
  per address (``DEVICE_USER_CODE_RATE`` each). A user code is short by design, so guessing one
  must be slow: per user stops one account trying many codes, per address stops one machine
  trying from many accounts. Right codes never count.

The first two are DRF throttles, with the rate read at request time (see accounts/throttles.py
for why). The guesses are counted in fixed windows with the cache's atomic ``incr``, so parallel
wrong guesses are each counted; the price of fixed windows is that a guesser may spend two
windows' allowance around a boundary, which still leaves guessing hopeless.
"""

from __future__ import annotations

import math

from rest_framework.settings import api_settings
from rest_framework.throttling import SimpleRateThrottle


class _AddressThrottle(SimpleRateThrottle):
    def get_rate(self):
        return api_settings.DEFAULT_THROTTLE_RATES[self.scope]

    def get_cache_key(self, request, view):
        # get_ident honours NUM_PROXIES (0: REMOTE_ADDR, which uvicorn sets from trusted proxies).
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


class DeviceCodeThrottle(_AddressThrottle):
    scope = "device_code"


class DevicePollThrottle(_AddressThrottle):
    scope = "device_poll"


class UserCodeGuessThrottle(_AddressThrottle):
    scope = "device_user_code"

    def __init__(self, request):
        super().__init__()
        now = self.timer()
        window = int(now // self.duration)
        self.seconds_left = max(1, math.ceil(self.duration - now % self.duration))
        self.keys = [
            f"throttle_device_user_code_user_{request.user.pk}_{window}",
            f"throttle_device_user_code_addr_{self.get_ident(request)}_{window}",
        ]

    def wait(self) -> int | None:
        """Seconds until guessing is allowed again, or None while it is."""
        counts = self.cache.get_many(self.keys)
        if any(counts.get(key, 0) >= self.num_requests for key in self.keys):
            return self.seconds_left
        return None

    def record_failure(self) -> None:
        for key in self.keys:
            self.cache.add(key, 0, self.duration)  # a no-op when the window's counter exists
            try:
                self.cache.incr(key)
            except ValueError:  # evicted between the two calls: count from one
                self.cache.set(key, 1, self.duration)
