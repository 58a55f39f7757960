"""The one bearer check shared by DRF, Ninja, the proxy consumer and the WebSocket.

``authenticate_bearer(token) -> Principal`` or ``AuthFailed(reason)``. An API key (``tt_…``) is
found by its prefix and compared by hash in constant time; anything else is read as a signed
access token naming a token family, which must not be revoked. One query either way (the user and
their wallet joined in), plus a throttled ``last_used_at`` write for keys.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.core import signing
from django.utils import timezone

from .models import ApiKey, Scope, TokenFamily, User
from .services import ACCESS_SALT, API_KEY_PREFIX, sha256_hex

LAST_USED_RESOLUTION = timedelta(minutes=1)  # don't write a row on every single request
# The wallet rides along in the same query (a join on a unique key): nearly every bearer request
# — above all each proxied one — needs it next, and a second query would cost a round trip.
_WITH_USER = ("user", "user__wallet")


class AuthFailed(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Principal:
    user: User
    api_key: ApiKey | None = None

    def has_scope(self, scope: str) -> bool:
        # Desktop tokens act as the user themselves: proxy use only, never billing others.
        if self.api_key is None:
            return scope == Scope.PROXY
        return self.api_key.has_scope(scope)


def bearer_from_header(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate_bearer(token: str | None) -> Principal:
    if not token:
        raise AuthFailed("missing bearer token")
    if token.startswith(API_KEY_PREFIX):
        return _authenticate_key(token)
    return _authenticate_access_token(token)


def _one(queryset):
    """The row a lookup by a unique key found, or None."""
    return next(iter(queryset.order_by()[:1]), None)


def _authenticate_key(token: str) -> Principal:
    # The prefix is unique: no ORDER BY (``first()`` would sort by the model's ordering).
    key = _one(ApiKey.objects.select_related(*_WITH_USER).filter(prefix=token[: ApiKey.PREFIX_LENGTH]))
    if key is None or not hmac.compare_digest(key.key_hash, sha256_hex(token)):
        raise AuthFailed("invalid API key")
    now = timezone.now()
    if key.revoked_at is not None:
        raise AuthFailed("this API key has been revoked")
    if key.expires_at is not None and key.expires_at <= now:
        raise AuthFailed("this API key has expired")
    if not key.user.is_active:
        raise AuthFailed("this account is disabled")
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return Principal(user=key.user, api_key=key)


def _authenticate_access_token(token: str) -> Principal:
    try:
        payload = signing.loads(token, salt=ACCESS_SALT, max_age=settings.ACCESS_TOKEN_TTL)
    except signing.SignatureExpired:
        raise AuthFailed("access token expired") from None
    except signing.BadSignature:
        raise AuthFailed("invalid access token") from None
    family = _one(
        TokenFamily.objects.select_related(*_WITH_USER).filter(
            pk=payload.get("f"), revoked_at__isnull=True, user__is_active=True
        )
    )
    if family is None:
        raise AuthFailed("this session has been revoked")
    return Principal(user=family.user)
