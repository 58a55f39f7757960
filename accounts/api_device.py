"""/api/auth/device and /api/auth/device/token: browser sign-in for apps (RFC 8628 semantics).

Neither takes a credential: an app that is not signed in yet asks for codes, then polls with its
device code until the user has approved or denied on the portal's /device page. Polling answers
RFC 8628's errors as 400 ``{"error": …, "detail": …}``, so a client written for the RFC reads
them as it would any authorization server's.
"""

from __future__ import annotations

from django.conf import settings
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.response import Response

from .api import _CredentialView, _pair
from .device import DeviceFlowError, device_authorization_create, device_token_redeem
from .serializers import (
    DeviceCodeOutSerializer,
    DeviceCodeRequestSerializer,
    DeviceTokenErrorSerializer,
    DeviceTokenRequestSerializer,
    TokenPairOutSerializer,
)
from .throttles_device import DeviceCodeThrottle, DevicePollThrottle

_429 = OpenApiResponse(description="too many requests from this address; see Retry-After")


class DeviceCodeView(_CredentialView):
    throttle_classes = [DeviceCodeThrottle]

    @extend_schema(
        operation_id="auth_device",
        description="Starts a browser sign-in for an app: show `user_code`, open `verification_uri_complete`, "
        "then poll /api/auth/device/token with `device_code` every `interval` seconds. Throttled per client "
        "address (DEVICE_CODE_RATE).",
        request=DeviceCodeRequestSerializer,
        responses={200: DeviceCodeOutSerializer, 400: OpenApiResponse(description="invalid input"), 429: _429},
        auth=[],
    )
    def post(self, request):
        serializer = DeviceCodeRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        codes = device_authorization_create(client_name=serializer.validated_data["client_name"])
        page = f"{settings.APP_URL}/device"
        return Response(
            {
                "device_code": codes.device_code,
                "user_code": codes.user_code,
                "verification_uri": page,
                "verification_uri_complete": f"{page}?code={codes.user_code}",
                "expires_in": settings.DEVICE_CODE_TTL,
                "interval": codes.authorization.interval,
            }
        )


class DeviceTokenView(_CredentialView):
    throttle_classes = [DevicePollThrottle]

    @extend_schema(
        operation_id="auth_device_token",
        description="Polls a browser sign-in. 400 with `error` = `authorization_pending` (keep polling), "
        "`slow_down` (polled sooner than `interval`; the new `interval` is in the body), `access_denied`, "
        "`expired_token` or `invalid_grant` (unknown or already used); 200 with the token pair exactly once "
        "after the user approved. Throttled per client address (DEVICE_POLL_RATE).",
        request=DeviceTokenRequestSerializer,
        responses={200: TokenPairOutSerializer, 400: DeviceTokenErrorSerializer, 429: _429},
        auth=[],
    )
    def post(self, request):
        serializer = DeviceTokenRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            pair = device_token_redeem(device_code=serializer.validated_data["device_code"])
        except DeviceFlowError as exc:
            body: dict[str, object] = {"error": exc.error, "detail": exc.message}
            if exc.interval is not None:
                body["interval"] = exc.interval
            return Response(body, status=400)
        return Response(_pair(pair))
