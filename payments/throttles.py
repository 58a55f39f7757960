"""How often a user may start a checkout.

Each checkout is a call to the payment provider's API (and a row here), so a script looping on
``POST /api/checkout`` or the top-up form would spend our provider quota and fill the table.
``POST /api/checkout`` and the portal's top-up form count in one bucket per user, against
``CHECKOUT_RATE``; every attempt counts, as DRF's throttles count requests.
"""

from __future__ import annotations

from accounts.throttles import LiveRateThrottle


class CheckoutThrottle(LiveRateThrottle):
    scope = "checkout"

    def get_cache_key(self, request, view):
        # Both entry points require a signed-in user before the throttle runs.
        return self.cache_format % {"scope": self.scope, "ident": request.user.pk}
