"""Ninja glue for the shared bearer check: ``request.auth`` is a ``Principal``.

An API key's ``rpm``, and its user's, count every ``/v1`` request made with it, on the same
counters as the proxy's (``proxy.limits``). It is checked here, once the key is known, so that no ``/v1`` endpoint can
forget it; ``LimitExceeded`` propagates to ``infra.ninja``, which answers the 429.
"""

from django.utils import timezone
from ninja.security import HttpBearer

from accounts.auth import AuthFailed, authenticate_bearer
from accounts.authentication import OPERATOR_KEY_ELSEWHERE

from . import limits


class BearerAuth(HttpBearer):
    def authenticate(self, request, token):
        try:
            principal = authenticate_bearer(token)
        except AuthFailed as exc:
            request.auth_failure = exc.reason
            return None
        if principal.is_operator_key:
            request.auth_failure = OPERATOR_KEY_ELSEWHERE
            return None
        request.user = principal.user
        limits.check_rpm(api_key=principal.api_key, now=timezone.now(), user=principal.user)
        return principal
