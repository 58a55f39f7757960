"""DRF glue for the shared bearer check."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from .auth import AuthFailed, authenticate_bearer, bearer_from_header


class BearerAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        token = bearer_from_header(request.headers.get("Authorization"))
        if token is None:
            return None
        try:
            principal = authenticate_bearer(token)
        except AuthFailed as exc:
            raise exceptions.AuthenticationFailed(exc.reason) from None
        return principal.user, principal

    def authenticate_header(self, request):
        return self.keyword


class BearerAuthenticationScheme(OpenApiAuthenticationExtension):
    """Tells drf-spectacular how the bearer credential looks in the OpenAPI schema."""

    target_class = BearerAuthentication
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (tt_…) or a desktop access token from /api/auth/token.",
        }
