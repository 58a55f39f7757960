"""DRF glue for the shared bearer check."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from .auth import AuthFailed, Principal, authenticate_bearer, bearer_from_header

OPERATOR_KEY_ELSEWHERE = "an operator key works only on the operator API (/api/admin/)"
ORG_KEY_ELSEWHERE = "an organization's API key works only on /v1; manage the organization as one of its members"


class BearerAuthentication(authentication.BaseAuthentication):
    """The account API's bearer check. An operator key (``admin`` scope) is refused here: it is
    a staff credential for ``/api/admin/``, not a way to act as its owner's own account."""

    keyword = "Bearer"
    operator_keys = False  # the operator API's subclass takes them (and only them)

    def authenticate(self, request):
        token = bearer_from_header(request.headers.get("Authorization"))
        if token is None:
            return None
        try:
            principal = authenticate_bearer(token)
        except AuthFailed as exc:
            raise exceptions.AuthenticationFailed(exc.reason) from None
        self.check_kind(principal)
        return principal.user, principal

    def check_kind(self, principal: Principal) -> None:
        if principal.is_operator_key and not self.operator_keys:
            raise exceptions.AuthenticationFailed(OPERATOR_KEY_ELSEWHERE)
        if principal.api_key is not None and principal.api_key.organization_id is not None:
            raise exceptions.AuthenticationFailed(ORG_KEY_ELSEWHERE)

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
