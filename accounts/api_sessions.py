"""/api/auth/me, /api/auth/sessions (the user's signed-in apps) and /api/auth/web-link.

Signing an app out, or minting a link that signs a browser in, is for the user themself — an
access token or a portal session. An API key gets 403: a leaked key must not be able to end its
owner's logins, or open the portal as them.
"""

from __future__ import annotations

from django.conf import settings
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import permissions, status
from rest_framework.response import Response
from rest_framework.views import APIView

from .auth import Principal
from .selectors import token_family_get, token_family_list
from .serializers import (
    SessionSerializer,
    UserOutSerializer,
    WebLinkOutSerializer,
    WebLinkRequestSerializer,
)
from .services import token_family_revoke
from .weblinks import web_link_create

_401 = OpenApiResponse(description="missing, bad or revoked credential")
_403 = OpenApiResponse(description="an API key cannot do this; use an access token")


class NotAnApiKey(permissions.BasePermission):
    message = "API keys cannot do this; use a desktop access token or the portal"

    def has_permission(self, request, view):
        return not (isinstance(request.auth, Principal) and request.auth.api_key is not None)


class MeView(APIView):
    @extend_schema(operation_id="auth_me", responses={200: UserOutSerializer, 401: _401}, summary="Who am I")
    def get(self, request):
        return Response({"id": request.user.pk, "email": request.user.email})


def _current_family(request):
    return request.auth.family_id if isinstance(request.auth, Principal) else None


class SessionListView(APIView):
    permission_classes = [permissions.IsAuthenticated, NotAnApiKey]

    @extend_schema(
        operation_id="auth_sessions_list",
        responses={200: SessionSerializer(many=True), 401: _401, 403: _403},
        summary="Your signed-in apps (active logins), most recently used first",
    )
    def get(self, request):
        families = token_family_list(user=request.user)
        context = {"current_family_id": _current_family(request)}
        return Response(SessionSerializer(families, many=True, context=context).data)


class SessionDetailView(APIView):
    permission_classes = [permissions.IsAuthenticated, NotAnApiKey]

    @extend_schema(
        operation_id="auth_sessions_revoke",
        responses={204: None, 401: _401, 403: _403, 404: None},
        summary="Sign an app out: its refresh and access tokens stop working at once",
    )
    def delete(self, request, id: str):
        token_family_revoke(family=token_family_get(user=request.user, family_id=id), reason="signed_out")
        return Response(status=status.HTTP_204_NO_CONTENT)


class WebLinkView(APIView):
    permission_classes = [permissions.IsAuthenticated, NotAnApiKey]

    @extend_schema(
        operation_id="auth_web_link",
        request=WebLinkRequestSerializer,
        responses={
            201: WebLinkOutSerializer,
            400: OpenApiResponse(description="`next` is not one of our pages"),
            401: _401,
            403: _403,
        },
        summary="A one-time link that signs a browser into the portal and lands on `next`",
    )
    def post(self, request):
        serializer = WebLinkRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        _link, token = web_link_create(user=request.user, next=serializer.validated_data["next"])
        body = {"url": f"{settings.APP_URL}/auth/link/{token}", "expires_in": settings.WEB_LINK_TTL}
        return Response(body, status=status.HTTP_201_CREATED)
