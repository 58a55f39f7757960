"""Ninja glue for the shared bearer check: ``request.auth`` is a ``Principal``."""

from ninja.security import HttpBearer

from .auth import AuthFailed, authenticate_bearer


class BearerAuth(HttpBearer):
    def authenticate(self, request, token):
        try:
            principal = authenticate_bearer(token)
        except AuthFailed as exc:
            request.auth_failure = exc.reason
            return None
        request.user = principal.user
        return principal
