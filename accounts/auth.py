"""The one bearer check shared by DRF, Ninja, the proxy consumer and the WebSocket.

``authenticate_bearer(token) -> Principal`` or ``AuthFailed(reason)``. An API key (``tt_…``) is
found by its prefix and compared by hash in constant time; anything else is read as a signed
access token naming a token family, which must not be revoked. One query either way (the user and
their wallet joined in), plus a throttled ``last_used_at`` write for keys.

``aauthenticate_bearer`` is the same check for the proxy's event loop: on PostgreSQL it runs the
same lookup as one statement on the hot path's async connections (``config.adb``), elsewhere it
is ``authenticate_bearer`` in a worker thread. The rules themselves are written once, below.
"""

from __future__ import annotations

import hmac
import uuid
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.core import signing
from django.utils import timezone

from config import adb
from wallet.models import Wallet

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


def _checked_key(key: ApiKey | None, token: str, now) -> bool:
    """Refuse a key that does not match, is revoked or expired, or whose user is disabled;
    True when its ``last_used_at`` is stale enough to be written."""
    if key is None or not hmac.compare_digest(key.key_hash, sha256_hex(token)):
        raise AuthFailed("invalid API key")
    if key.revoked_at is not None:
        raise AuthFailed("this API key has been revoked")
    if key.expires_at is not None and key.expires_at <= now:
        raise AuthFailed("this API key has expired")
    if not key.user.is_active:
        raise AuthFailed("this account is disabled")
    return key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION


def _authenticate_key(token: str) -> Principal:
    # The prefix is unique: no ORDER BY (``first()`` would sort by the model's ordering).
    key = _one(ApiKey.objects.select_related(*_WITH_USER).filter(prefix=token[: ApiKey.PREFIX_LENGTH]))
    now = timezone.now()
    if _checked_key(key, token, now):
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return Principal(user=key.user, api_key=key)


def _access_token_family(token: str):
    """The token family id a valid access token names."""
    try:
        payload = signing.loads(token, salt=ACCESS_SALT, max_age=settings.ACCESS_TOKEN_TTL)
    except signing.SignatureExpired:
        raise AuthFailed("access token expired") from None
    except signing.BadSignature:
        raise AuthFailed("invalid access token") from None
    return payload.get("f")


def _authenticate_access_token(token: str) -> Principal:
    family = _one(
        TokenFamily.objects.select_related(*_WITH_USER).filter(
            pk=_access_token_family(token), revoked_at__isnull=True, user__is_active=True
        )
    )
    if family is None:
        raise AuthFailed("this session has been revoked")
    return Principal(user=family.user)


# --- the same on the event loop ----------------------------------------------------------------

# The ORM's select_related(*_WITH_USER) above, as one statement for the async connections. (S608:
# the identifiers come from model metadata; every value is a bound parameter.)
_KEY_SQL = (
    f"SELECT {adb.columns(ApiKey, 'k')}, {adb.columns(User, 'u')}, {adb.columns(Wallet, 'w')} "  # noqa: S608
    f'FROM "{ApiKey._meta.db_table}" k JOIN "{User._meta.db_table}" u ON u.id = k.user_id '
    f'LEFT JOIN "{Wallet._meta.db_table}" w ON w.user_id = u.id WHERE k.prefix = %s LIMIT 1'
)
_FAMILY_SQL = (
    f"SELECT {adb.columns(TokenFamily, 'f')}, {adb.columns(User, 'u')}, {adb.columns(Wallet, 'w')} "  # noqa: S608
    f'FROM "{TokenFamily._meta.db_table}" f JOIN "{User._meta.db_table}" u ON u.id = f.user_id '
    f'LEFT JOIN "{Wallet._meta.db_table}" w ON w.user_id = u.id '
    "WHERE f.id = %s AND f.revoked_at IS NULL AND u.is_active LIMIT 1"
)
_TOUCH_SQL = f'UPDATE "{ApiKey._meta.db_table}" SET last_used_at = %s WHERE id = %s'  # noqa: S608


def _user_with_wallet(row: tuple, start: int) -> User:
    user, end = adb.load(User, row, start)
    wallet, _ = adb.load(Wallet, row, end)
    if wallet is not None:
        user.wallet = wallet  # as select_related("user__wallet") caches it
    return user


async def aauthenticate_bearer(token: str | None) -> Principal:
    if not adb.native():
        return await adb.in_thread(authenticate_bearer)(token)
    if not token:
        raise AuthFailed("missing bearer token")
    if token.startswith(API_KEY_PREFIX):
        row = await adb.fetchone(_KEY_SQL, [token[: ApiKey.PREFIX_LENGTH]], retry=True)
        key = None
        if row is not None:
            key, end = adb.load(ApiKey, row)
            key.user = _user_with_wallet(row, end)
        now = timezone.now()
        if _checked_key(key, token, now):
            await adb.execute(_TOUCH_SQL, [now, key.pk], retry=True)
            key.last_used_at = now
        return Principal(user=key.user, api_key=key)
    family_id = _access_token_family(token)
    try:
        row = await adb.fetchone(_FAMILY_SQL, [uuid.UUID(str(family_id))], retry=True)
    except ValueError:  # a signed token naming no valid family id: cannot happen unless our key leaked
        row = None
    if row is None:
        raise AuthFailed("this session has been revoked")
    _, end = adb.load(TokenFamily, row)
    return Principal(user=_user_with_wallet(row, end))
