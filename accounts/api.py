"""/api/auth/* (sign-up and desktop tokens) and /api/keys (API key management).

Who may do what:

* ``/api/auth/*`` needs no credential: the password or the refresh token in the body *is* the
  credential. These views ignore the ``Authorization`` header, so a desktop client that sends its
  expired access token along with a refresh still gets a new pair.
* ``/api/account/limits`` likewise: any credential reads the user's limits, only the user
  themself (access token or session) changes their own budget.
* ``/api/keys`` accepts any credential (access token, API key or portal session) for reading,
  but creating, renaming and revoking keys needs the user themself — an access token or a
  session. An API key can only list keys: a leaked key must not be able to mint fresh keys
  that outlive its own revocation, or revoke the owner's other keys.
"""

from __future__ import annotations

from django.contrib.auth import authenticate
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions, permissions, status
from rest_framework.response import Response
from rest_framework.views import APIView

from .auth import Principal
from .models import DEFAULT_SESSION_NAME
from .selectors import api_key_get, api_key_list
from .serializers import (
    DUPLICATE_EMAIL,
    AccountLimitsSerializer,
    ApiKeyCreatedSerializer,
    ApiKeyCreateSerializer,
    ApiKeySerializer,
    ApiKeyUpdateSerializer,
    CredentialsSerializer,
    RefreshSerializer,
    SignupOutSerializer,
    SignupSerializer,
    TokenPairOutSerializer,
    UserLimitsSerializer,
    account_limits_data,
)
from .services import (
    InvalidRefreshToken,
    api_key_create,
    api_key_revoke,
    api_key_update,
    token_logout,
    token_pair_issue,
    token_refresh,
    user_own_limits_set,
    user_signup,
)
from .throttles import LoginFailureThrottle, SignupThrottle

_401 = OpenApiResponse(description="bad or revoked credential")
_429 = OpenApiResponse(description="too many attempts; see Retry-After")


def _pair(pair) -> dict:
    return {"access": pair.access, "refresh": pair.refresh, "expires_in": pair.expires_in}


class _CredentialView(APIView):
    """Base for endpoints whose credential travels in the body, not in ``Authorization``."""

    authentication_classes: list = []
    permission_classes = [permissions.AllowAny]

    def get_authenticate_header(self, request):
        # Makes DRF answer AuthenticationFailed with 401 + WWW-Authenticate rather than 403.
        return 'Bearer realm="api"'


class SignupView(_CredentialView):
    throttle_classes = [SignupThrottle]

    @extend_schema(
        operation_id="auth_signup",
        description="Creates an account (and its wallet, with the configured trial credit) and logs it in. "
        "Throttled per client address (SIGNUP_RATE).",
        request=SignupSerializer,
        responses={201: SignupOutSerializer, 400: OpenApiResponse(description="invalid input"), 429: _429},
        auth=[],
    )
    def post(self, request):
        serializer = SignupSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            user = user_signup(**serializer.validated_data)
        except IntegrityError:
            # Two sign-ups for one address raced past the serializer's check; the unique index decided.
            raise exceptions.ValidationError({"email": [DUPLICATE_EMAIL]}) from None
        pair = token_pair_issue(user=user)
        return Response({"user": {"id": user.pk, "email": user.email}, **_pair(pair)}, status=status.HTTP_201_CREATED)


class TokenView(_CredentialView):
    @extend_schema(
        operation_id="auth_token",
        description="Logs in with email and password. Failed attempts are throttled per client address, and "
        "per account and address while the account is under attack (LOGIN_RATE, counted together with /login "
        "and /admin/login/); while throttled the password is not checked. `client_name` names the "
        'login in the user\'s signed-in apps (default "API sign-in").',
        request=CredentialsSerializer,
        responses={200: TokenPairOutSerializer, 401: _401, 429: _429},
        auth=[],
    )
    def post(self, request):
        serializer = CredentialsSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        email = serializer.validated_data["email"].strip().lower()
        throttle = LoginFailureThrottle(request, email)
        wait = throttle.wait()
        if wait is not None:
            # DRF appends "Expected available in N seconds." and sets Retry-After.
            raise exceptions.Throttled(wait=wait, detail="Too many failed logins.")
        user = authenticate(request, email=email, password=serializer.validated_data["password"])
        if user is None:
            throttle.record_failure()
            raise exceptions.AuthenticationFailed("invalid email or password")
        name = serializer.validated_data.get("client_name") or DEFAULT_SESSION_NAME
        return Response(_pair(token_pair_issue(user=user, name=name)))


class TokenRefreshView(_CredentialView):
    @extend_schema(
        operation_id="auth_token_refresh",
        request=RefreshSerializer,
        responses={200: TokenPairOutSerializer, 401: _401},
        auth=[],
        description="Rotates the refresh token. Presenting a used one revokes the whole login (every "
        "access and refresh token descended from it).",
    )
    def post(self, request):
        serializer = RefreshSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            pair = token_refresh(refresh=serializer.validated_data["refresh"])
        except InvalidRefreshToken as exc:
            raise exceptions.AuthenticationFailed(str(exc)) from None
        return Response(_pair(pair))


class LogoutView(_CredentialView):
    @extend_schema(
        operation_id="auth_logout",
        request=RefreshSerializer,
        responses={204: None, 401: _401},
        auth=[],
        description="Ends the login the refresh token belongs to; its access tokens stop working too.",
    )
    def post(self, request):
        serializer = RefreshSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            token_logout(refresh=serializer.validated_data["refresh"])
        except InvalidRefreshToken as exc:
            raise exceptions.AuthenticationFailed(str(exc)) from None
        return Response(status=status.HTTP_204_NO_CONTENT)


class ManagesKeysUnlessApiKey(permissions.BasePermission):
    message = "API keys can list keys but not create, change or revoke them; use the portal or a desktop login"

    def has_permission(self, request, view):
        if request.method in permissions.SAFE_METHODS:
            return True
        return not (isinstance(request.auth, Principal) and request.auth.api_key is not None)


class KeyListView(APIView):
    permission_classes = [permissions.IsAuthenticated, ManagesKeysUnlessApiKey]

    @extend_schema(operation_id="keys_list", responses={200: ApiKeySerializer(many=True), 401: _401})
    def get(self, request):
        return Response(ApiKeySerializer(api_key_list(user=request.user), many=True).data)

    @extend_schema(
        operation_id="keys_create",
        request=ApiKeyCreateSerializer,
        responses={201: ApiKeyCreatedSerializer, 400: OpenApiResponse(description="invalid input"), 401: _401},
        description="Creates a key with the `proxy` scope. `key` (the secret) is in this response only.",
    )
    def post(self, request):
        serializer = ApiKeyCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        key, secret = api_key_create(user=request.user, **serializer.validated_data)
        return Response(ApiKeyCreatedSerializer(key, context={"secret": secret}).data, status=status.HTTP_201_CREATED)


class KeyDetailView(APIView):
    permission_classes = [permissions.IsAuthenticated, ManagesKeysUnlessApiKey]

    @extend_schema(operation_id="keys_retrieve", responses={200: ApiKeySerializer, 401: _401, 404: None})
    def get(self, request, id: int):
        return Response(ApiKeySerializer(api_key_get(user=request.user, key_id=id)).data)

    @extend_schema(
        operation_id="keys_update",
        request=ApiKeyUpdateSerializer,
        responses={200: ApiKeySerializer, 400: OpenApiResponse(description="invalid input"), 401: _401, 404: None},
    )
    def patch(self, request, id: int):
        key = api_key_get(user=request.user, key_id=id)
        serializer = ApiKeyUpdateSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        key = api_key_update(key=key, **serializer.validated_data)
        return Response(ApiKeySerializer(key).data)

    @extend_schema(
        operation_id="keys_revoke",
        responses={204: None, 401: _401, 404: None},
        description="Revokes the key at once. It stays listed (revoked: true) for the audit trail.",
    )
    def delete(self, request, id: int):
        api_key_revoke(key=api_key_get(user=request.user, key_id=id))
        return Response(status=status.HTTP_204_NO_CONTENT)


class ChangesLimitsUnlessApiKey(ManagesKeysUnlessApiKey):
    # A leaked key must not be able to lift the budget its owner set.
    message = "API keys can read limits but not change them; use the portal or a desktop login"


class AccountLimitsView(APIView):
    """``/api/account/limits``: the user's limits — staff's, their own, and the stricter in force."""

    permission_classes = [permissions.IsAuthenticated, ChangesLimitsUnlessApiKey]

    @extend_schema(operation_id="account_limits_retrieve", responses={200: AccountLimitsSerializer, 401: _401})
    def get(self, request):
        return Response(account_limits_data(request.user))

    @extend_schema(
        operation_id="account_limits_update",
        request=UserLimitsSerializer(partial=True),
        responses={
            200: AccountLimitsSerializer,
            400: OpenApiResponse(description="not a limit, or looser than staff's; errors by limit name"),
            401: _401,
            403: OpenApiResponse(description="an API key cannot change limits"),
        },
        description="Sets your own limits: the limits given are replaced (null clears one), the others "
        "are kept. Each may only be tighter than the limit staff set.",
    )
    def patch(self, request):
        if not isinstance(request.data, dict):
            raise exceptions.ValidationError({"non_field_errors": ["send a JSON object of limits"]})
        wanted = {**(request.user.own_limits or {}), **request.data}
        try:
            user = user_own_limits_set(user=request.user, limits=wanted)
        except DjangoValidationError as exc:
            detail = exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
            raise exceptions.ValidationError(detail) from None
        return Response(account_limits_data(user))
